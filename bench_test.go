package idempotency_test

import (
	"context"
	"net"
	"path/filepath"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"

	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	paymentsv1 "github.com/grpcidem/idempotency/proto/payments/v1"
)

// benchPayments answers at once, so that the benchmarks measure the
// interceptor and the store, not the handler.
type benchPayments struct {
	paymentsv1.UnimplementedPaymentServiceServer
}

func (benchPayments) Charge(ctx context.Context, req *paymentsv1.ChargeRequest) (*paymentsv1.ChargeResponse, error) {
	return &paymentsv1.ChargeResponse{ChargeId: "ch_0123456789abcdef", Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}, nil
}

// ChargeInstallments sends its installments at once, with ids that cost
// nothing to make.
func (benchPayments) ChargeInstallments(req *paymentsv1.InstallmentsRequest, ss grpc.ServerStreamingServer[paymentsv1.ChargeResponse]) error {
	_ = ss.SetHeader(metadata.Pairs("x-plan", "installments"))
	amount := req.AmountCents / int64(req.Count)
	for i := range req.Count {
		if err := ss.Send(&paymentsv1.ChargeResponse{ChargeId: "ch_" + strconv.Itoa(int(i)) + "_0123456789ab", Account: req.Account, AmountCents: amount, Currency: req.Currency}); err != nil {
			return err
		}
	}
	ss.SetTrailer(metadata.Pairs("x-count", "done"))
	return nil
}

// benchClient starts a bufconn server with the interceptors on store (none
// when store is nil) and returns a client for it.
func benchClient(b *testing.B, store idempotency.Store) paymentsv1.PaymentServiceClient {
	b.Helper()
	lis := bufconn.Listen(1 << 20)
	var opts []grpc.ServerOption
	if store != nil {
		opts = append(opts, grpc.UnaryInterceptor(idempotency.UnaryServerInterceptor(store)),
			grpc.StreamInterceptor(idempotency.StreamServerInterceptor(store)))
	}
	srv := grpc.NewServer(opts...)
	paymentsv1.RegisterPaymentServiceServer(srv, benchPayments{})
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		conn.Close()
		srv.Stop()
	})
	return paymentsv1.NewPaymentServiceClient(conn)
}

// BenchmarkUnary measures the cost of one call over bufconn: without the
// interceptor, and with it on each store, for first executions (a fresh key
// per call) and replays (one key). -cpu sets GOMAXPROCS; the p64 variants run
// 64 callers at once.
//
//	go test -run '^$' -bench BenchmarkUnary -benchmem -count 5 .
func BenchmarkUnary(b *testing.B) {
	type storeCase struct {
		name string
		open func(b *testing.B) idempotency.Store
	}
	cases := []storeCase{
		{"none", nil},
		{"memory", func(b *testing.B) idempotency.Store {
			s := idempotency.NewMemoryStore()
			b.Cleanup(func() { s.Close() })
			return s
		}},
		{"bolt", func(b *testing.B) idempotency.Store {
			s, err := idempotency.OpenBolt(filepath.Join(b.TempDir(), "bench.db"))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { s.Close() })
			return s
		}},
	}
	req := &paymentsv1.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	for _, sc := range cases {
		modes := []string{"first", "replay"}
		if sc.open == nil {
			modes = []string{"baseline"}
		}
		for _, mode := range modes {
			for _, par := range []int{1, 64} {
				b.Run(sc.name+"/"+mode+"/p"+strconv.Itoa(par), func(b *testing.B) {
					var store idempotency.Store
					if sc.open != nil {
						store = sc.open(b)
					}
					client := benchClient(b, store)
					var seq atomic.Int64
					// A replay's key is the same on every call, as a
					// client's retries carry it; a first execution needs
					// a fresh one each time.
					replayCtx := metadata.AppendToOutgoingContext(context.Background(), idempotency.KeyHeader, "the-one-key")
					call := func(ctx context.Context) {
						switch {
						case store == nil:
						case mode == "replay":
							ctx = replayCtx
						default:
							ctx = metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, "k-"+strconv.FormatInt(seq.Add(1), 36))
						}
						if _, err := client.Charge(ctx, req); err != nil {
							b.Error(err)
						}
					}
					ctx := context.Background()
					call(ctx) // warm up the connection, and store the replayed record
					b.ReportAllocs()
					b.ResetTimer()
					if par == 1 {
						for b.Loop() {
							call(ctx)
						}
						return
					}
					b.SetParallelism(max(1, par/runtimeProcs()))
					b.RunParallel(func(pb *testing.PB) {
						for pb.Next() {
							call(ctx)
						}
					})
					if bs, ok := store.(*idempotency.BoltStore); ok && mode == "first" {
						st := bs.Stats()
						b.ReportMetric(float64(st.Records)/float64(st.Commits), "records/commit")
						b.ReportMetric(float64(st.CommitTime.Microseconds())/float64(st.Commits), "µs/commit")
					}
				})
			}
		}
	}
}

func runtimeProcs() int { return runtime.GOMAXPROCS(0) }

// BenchmarkBoltCommit is the floor of a durable first execution: one bbolt
// transaction that writes one small value, with its two fsyncs, measured on
// the same disk in the same run.
func BenchmarkBoltCommit(b *testing.B) {
	db, err := bolt.Open(filepath.Join(b.TempDir(), "raw.db"), 0o600, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	value := make([]byte, 200)
	var seq uint64
	for b.Loop() {
		seq++
		err := db.Update(func(tx *bolt.Tx) error {
			bk, err := tx.CreateBucketIfNotExists([]byte("b"))
			if err != nil {
				return err
			}
			return bk.Put([]byte(strconv.FormatUint(seq, 36)), value)
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkInterceptorOnly measures the unary server interceptor alone,
// called in process with a no-op transport: what idempotency adds to a call,
// without the network and gRPC's own work, which dominate and vary the
// bufconn numbers.
//
//	go test -run '^$' -bench BenchmarkInterceptorOnly -benchmem .
func BenchmarkInterceptorOnly(b *testing.B) {
	info := &grpc.UnaryServerInfo{FullMethod: paymentsv1.PaymentService_Charge_FullMethodName}
	req := &paymentsv1.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	handler := func(ctx context.Context, r any) (any, error) {
		return benchPayments{}.Charge(ctx, r.(*paymentsv1.ChargeRequest))
	}
	stores := map[string]func(b *testing.B) idempotency.Store{
		"memory": func(b *testing.B) idempotency.Store { return idempotency.NewMemoryStore() },
		"bolt": func(b *testing.B) idempotency.Store {
			s, err := idempotency.OpenBolt(filepath.Join(b.TempDir(), "bench.db"))
			if err != nil {
				b.Fatal(err)
			}
			return s
		},
	}
	for _, name := range []string{"memory", "bolt"} {
		b.Run(name+"/replay", func(b *testing.B) {
			store := stores[name](b)
			defer store.Close()
			unary := idempotency.UnaryServerInterceptor(store)
			ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(idempotency.KeyHeader, "the-one-key"))
			ctx = grpc.NewContextWithServerTransportStream(ctx, nopTransport{})
			if _, err := unary(ctx, req, info, handler); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := unary(ctx, req, info, handler); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
