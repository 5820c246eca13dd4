package pgstore_test

import (
	"context"
	"net"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
)

// Run with -cpu 1, so that the p64 benchmarks run 64 goroutines:
//
//	go test -run '^$' -bench . -cpu 1 ./pgstore
//
// Each sub-benchmark also reports cpu-µs/op, pg-cpu-µs/op and pg-be-cpu-µs/op:
// the CPU time of this process, of the PostgreSQL server, and of the server's
// backends that serve the benchmark's pool, per op (see cpuMeter).

func benchPool(b *testing.B) *pgxpool.Pool {
	return newPool(b, func(c *pgxpool.Config) {
		c.MaxConns = 32
		// Names the pool's backends for cpuMeter's pg-be-cpu-µs/op.
		c.ConnConfig.RuntimeParams["application_name"] = "pgstore-bench-" + randomHex(4)
	})
}

// parallelism runs body serially (p1) and from 64 goroutines per CPU (p64).
func parallelism(b *testing.B, body func(b *testing.B, next func() int64)) {
	var n atomic.Int64
	next := func() int64 { return n.Add(1) }
	b.Run("p1", func(b *testing.B) { body(b, next) })
	b.Run("p64", func(b *testing.B) {
		b.SetParallelism(64)
		body(b, next)
	})
}

// loop times op, and reports cpu's metrics for the timed loop only.
func loop(b *testing.B, cpu *cpuMeter, op func()) {
	cpu.start()
	defer cpu.stop(b)
	if b.Name()[len(b.Name())-3:] == "p64" {
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				op()
			}
		})
		b.StopTimer()
		return
	}
	for b.Loop() { // resets the timer on its first call, stops it on its last
		op()
	}
}

// BenchmarkStoreFirstExecution: Reserve of a fresh key, then Complete.
func BenchmarkStoreFirstExecution(b *testing.B) {
	pool := benchPool(b)
	s := newStore(b, pool, newTable(b, pool))
	cpu := newCPUMeter(pool)
	record := make([]byte, 256)
	prefix := key("bench-first")
	parallelism(b, func(b *testing.B, next func() int64) {
		ctx := context.Background()
		loop(b, cpu, func() {
			k, tok := prefix+strconv.FormatInt(next(), 10), token()
			e, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Minute})
			if err != nil || e.State != idempotency.Acquired {
				b.Fatalf("Reserve: %v, %v", e.State, err)
			}
			if err := s.Complete(ctx, k, tok, record, time.Hour); err != nil {
				b.Fatal(err)
			}
		})
	})
}

// BenchmarkStoreReplay: Reserve of a completed key, over 1024 keys.
func BenchmarkStoreReplay(b *testing.B) {
	pool := benchPool(b)
	s := newStore(b, pool, newTable(b, pool))
	ctx := context.Background()
	record := make([]byte, 256)
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = key("bench-replay")
		tok := token()
		s.Reserve(ctx, keys[i], idempotency.Claim{Token: tok, Lease: time.Minute})
		if err := s.Complete(ctx, keys[i], tok, record, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
	cpu := newCPUMeter(pool)
	parallelism(b, func(b *testing.B, next func() int64) {
		loop(b, cpu, func() {
			e, err := s.Reserve(ctx, keys[next()%int64(len(keys))], idempotency.Claim{Token: token(), Lease: time.Minute})
			if err != nil || e.State != idempotency.Completed {
				b.Fatalf("Reserve: %v, %v", e.State, err)
			}
		})
	})
}

// BenchmarkInterceptor measures Charge through gRPC (bufconn) with a handler
// that does no work of its own: without the interceptor (the baseline), a
// first execution on pgstore, and a replay. Real handlers do work, so the
// ratios are a floor.
func BenchmarkInterceptor(b *testing.B) {
	pool := benchPool(b)
	s := newStore(b, pool, newTable(b, pool))
	cpu := newCPUMeter(pool)
	p := &plainPayments{}
	for _, mode := range []string{"baseline", "first", "replay"} {
		b.Run(mode, func(b *testing.B) {
			var sopts []grpc.ServerOption
			if mode != "baseline" {
				sopts = append(sopts, grpc.ChainUnaryInterceptor(mustServer(s).UnaryServerInterceptor()))
			}
			srv := grpc.NewServer(sopts...)
			testpb.RegisterPaymentServiceServer(srv, p)
			lis := bufconn.Listen(1 << 20)
			go srv.Serve(lis)
			defer srv.Stop()
			cc, err := grpc.NewClient("passthrough:///bufnet", grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }))
			if err != nil {
				b.Fatal(err)
			}
			defer cc.Close()
			client := testpb.NewPaymentServiceClient(cc)
			req := &testpb.ChargeRequest{Account: "acct", AmountCents: 500, Currency: "EUR"}
			replayKeys := make([]string, 256)
			for i := range replayKeys {
				replayKeys[i] = idempotency.NewKey()
				if mode == "replay" {
					ctx := metadata.AppendToOutgoingContext(context.Background(), idempotency.KeyHeader, replayKeys[i])
					if _, err := client.Charge(ctx, req); err != nil {
						b.Fatal(err)
					}
				}
			}
			call := func(ctx context.Context, next func() int64) {
				switch mode {
				case "first":
					ctx = metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, idempotency.NewKey())
				case "replay":
					ctx = metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, replayKeys[next()%int64(len(replayKeys))])
				}
				if _, err := client.Charge(ctx, req); err != nil {
					b.Fatal(err)
				}
			}
			parallelism(b, func(b *testing.B, next func() int64) {
				loop(b, cpu, func() { call(context.Background(), next) })
			})
		})
	}
}

type plainPayments struct {
	testpb.UnimplementedPaymentServiceServer
}

func (plainPayments) Charge(_ context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	return &testpb.ChargeResponse{ChargeId: "ch_" + randomHex(8), Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}, nil
}

// BenchmarkDurableInsert is the floor of a first execution's store work on
// this database: one prepared INSERT of a small row into a table of its own,
// committed durably (one round trip and one WAL flush), as each of Reserve
// and Complete is. A first execution costs a bare call plus two of these.
//
//	go test -run '^$' -bench 'BenchmarkDurableInsert|BenchmarkInterceptor/(baseline|first)/p1' -count 6 .
func BenchmarkDurableInsert(b *testing.B) {
	pool := benchPool(b)
	table := newTable(b, pool)
	ctx := context.Background()
	if _, err := pool.Exec(ctx, "CREATE TABLE "+pgx.Identifier{table}.Sanitize()+" (key bytea PRIMARY KEY, token text NOT NULL)"); err != nil {
		b.Fatal(err)
	}
	insert := "INSERT INTO " + pgx.Identifier{table}.Sanitize() + " (key, token) VALUES ($1, $2)"
	cpu := newCPUMeter(pool)
	parallelism(b, func(b *testing.B, next func() int64) {
		loop(b, cpu, func() {
			if _, err := pool.Exec(ctx, insert, []byte(key("insert")), token()); err != nil {
				b.Fatal(err)
			}
		})
	})
}
