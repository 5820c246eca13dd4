package redisstore_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/internal/cpuclock"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"
)

// benchPayments answers at once, so that the benchmark measures the
// interceptor and the store, not the handler.
type benchPayments struct {
	testpb.UnimplementedPaymentServiceServer
}

func (benchPayments) Charge(_ context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	return &testpb.ChargeResponse{ChargeId: "ch_0123456789abcdef", Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}, nil
}

// twoRoundTrips is benchPayments whose Charge first makes the two round
// trips a first execution needs at least, as plain commands on its own
// fresh key: a SET NX PX to take the key, then a SET PX of a record of the
// size the store writes. A call without the interceptor to it is the floor
// of a first execution on Redis: a bare call plus two round trips, made by
// grpc-go's goroutine for the call as the store's are.
type twoRoundTrips struct {
	benchPayments
	rdb    *redis.Client
	prefix string
	seq    atomic.Int64
	record []byte
}

func (p *twoRoundTrips) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	key := p.prefix + strconv.FormatInt(p.seq.Add(1), 36)
	if err := p.rdb.SetArgs(ctx, key, "P", redis.SetArgs{Mode: "NX", TTL: idempotency.DefaultLease}).Err(); err != nil {
		return nil, err
	}
	if err := p.rdb.Set(ctx, key, p.record, time.Minute).Err(); err != nil {
		return nil, err
	}
	return p.benchPayments.Charge(ctx, req)
}

// benchGRPC starts a bufconn server of svc with the interceptors on store
// (none when store is nil) and returns a client for it.
func benchGRPC(b *testing.B, store idempotency.Store, svc testpb.PaymentServiceServer) testpb.PaymentServiceClient {
	b.Helper()
	lis := bufconn.Listen(1 << 20)
	var opts []grpc.ServerOption
	if store != nil {
		opts = mustServer(store).ServerOptions()
	}
	srv := grpc.NewServer(opts...)
	testpb.RegisterPaymentServiceServer(srv, svc)
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = conn.Close()
		srv.Stop()
	})
	return testpb.NewPaymentServiceClient(conn)
}

// BenchmarkUnary is the root package's BenchmarkUnary with the Redis store:
// one call over bufconn without the interceptor (the baseline, in the same
// run), and with it on Redis for first executions (a fresh key per call) and
// replays (one key), by 1 caller and by 64 at once; redis-ap is the store
// with WithAutoPipelining. none/two-round-trips is the floor of a first
// execution: a call without the interceptor whose handler makes two round
// trips of its own (twoRoundTrips).
//
// Each sub-benchmark also reports where the CPU goes during its timed loop:
// cpu-µs/op is this process's CPU time (user and system: the callers, the
// gRPC stack, the interceptor and the Redis client) per call, and
// redis-cpu-µs/op the Redis server's (INFO cpu: used_cpu_sys+used_cpu_user;
// left out if INFO fails). At p64 the benchmark, the gRPC stack and Redis all
// share the machine's cores, so (cpu-µs/op + redis-cpu-µs/op) / cores, with
// cores = GOMAXPROCS (the machine's cores by default), is a floor on µs/op:
// when it is close to the measured µs/op, the run is bound by the CPU, and on
// a 2-core machine no change to the store can bring a p64 first execution
// near the baseline's throughput.
//
//	go test -run '^$' -bench BenchmarkUnary -benchmem -count 5 .
func BenchmarkUnary(b *testing.B) {
	req := &testpb.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	for _, mode := range []string{"none/baseline", "none/two-round-trips", "redis/first", "redis/replay", "redis-ap/first", "redis-ap/replay"} {
		for _, par := range []int{1, 64} {
			b.Run(mode+"/p"+strconv.Itoa(par), func(b *testing.B) {
				var store idempotency.Store
				var rdb *redis.Client
				var svc testpb.PaymentServiceServer = benchPayments{}
				switch {
				case mode == "none/two-round-trips":
					rdb = benchClient(b)
					svc = &twoRoundTrips{rdb: rdb, prefix: testPrefix(b, rdb) + "rt:", record: make([]byte, 1+20+180)}
				case mode != "none/baseline":
					rdb = benchClient(b)
					var opts []redisstore.Option
					if strings.HasPrefix(mode, "redis-ap/") {
						opts = append(opts, redisstore.WithAutoPipelining())
					}
					store = newStore(b, rdb, testPrefix(b, rdb), opts...)
				case reachable() == nil:
					rdb = benchClient(b) // only to read Redis's CPU time
				}
				client := benchGRPC(b, store, svc)
				var seq atomic.Int64
				key := func() string {
					if strings.HasSuffix(mode, "/replay") {
						return "the-one-key"
					}
					return "k-" + strconv.FormatInt(seq.Add(1), 36)
				}
				call := func(ctx context.Context) {
					if store != nil {
						ctx = metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, key())
					}
					if _, err := client.Charge(ctx, req); err != nil {
						b.Error(err)
					}
				}
				ctx := context.Background()
				call(ctx) // warm up the connection and the scripts; store the replayed record
				b.ReportAllocs()
				cpu := startCPU(rdb)
				b.ResetTimer()
				if par == 1 {
					for b.Loop() {
						call(ctx)
					}
				} else {
					b.SetParallelism(max(1, par/runtime.GOMAXPROCS(0)))
					b.RunParallel(func(pb *testing.PB) {
						for pb.Next() {
							call(ctx)
						}
					})
				}
				b.StopTimer()
				cpu.stop(b)
			})
		}
	}
}

// cpuMeter measures the CPU time (user and system) that this process and the
// Redis server spend between startCPU and stop.
type cpuMeter struct {
	rdb      *redis.Client // nil: the Redis server's CPU time is not measured
	self     time.Duration
	selfOK   bool
	redis    float64 // seconds
	redisErr error
}

func startCPU(rdb *redis.Client) *cpuMeter {
	m := &cpuMeter{rdb: rdb}
	m.redis, m.redisErr = redisCPU(rdb)
	m.self, m.selfOK = cpuclock.Process()
	return m
}

// stop reports the CPU time since startCPU per op: cpu-µs/op for this
// process, and redis-cpu-µs/op for the Redis server unless INFO failed.
func (m *cpuMeter) stop(b *testing.B) {
	now, ok := cpuclock.Process()
	server, err := redisCPU(m.rdb)
	if ok && m.selfOK {
		b.ReportMetric(float64((now-m.self).Nanoseconds())/1e3/float64(b.N), "cpu-µs/op")
	}
	switch {
	case m.rdb == nil:
	case m.redisErr != nil || err != nil:
		b.Logf("no redis-cpu-µs/op: %v", errors.Join(m.redisErr, err))
	default:
		b.ReportMetric((server-m.redis)*1e6/float64(b.N), "redis-cpu-µs/op")
	}
}

// redisCPU returns the Redis server's CPU time in seconds, user and system,
// from INFO cpu.
func redisCPU(rdb *redis.Client) (float64, error) {
	if rdb == nil {
		return 0, nil
	}
	info, err := rdb.InfoMap(context.Background(), "cpu").Result()
	if err != nil {
		return 0, err
	}
	var seconds float64
	for _, field := range []string{"used_cpu_sys", "used_cpu_user"} {
		v, err := strconv.ParseFloat(info["CPU"][field], 64)
		if err != nil {
			return 0, fmt.Errorf("INFO cpu %s: %w", field, err)
		}
		seconds += v
	}
	return seconds, nil
}
