package redisstore_test

import (
	"context"
	"net"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/grpcidem/idempotency"
	paymentsv1 "github.com/grpcidem/idempotency/proto/payments/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"
)

// benchPayments answers at once, so that the benchmark measures the
// interceptor and the store, not the handler.
type benchPayments struct {
	paymentsv1.UnimplementedPaymentServiceServer
}

func (benchPayments) Charge(_ context.Context, req *paymentsv1.ChargeRequest) (*paymentsv1.ChargeResponse, error) {
	return &paymentsv1.ChargeResponse{ChargeId: "ch_0123456789abcdef", Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}, nil
}

func benchGRPC(b *testing.B, store idempotency.Store) paymentsv1.PaymentServiceClient {
	b.Helper()
	lis := bufconn.Listen(1 << 20)
	var opts []grpc.ServerOption
	if store != nil {
		opts = append(opts, grpc.UnaryInterceptor(idempotency.UnaryServerInterceptor(store)))
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
		_ = conn.Close()
		srv.Stop()
	})
	return paymentsv1.NewPaymentServiceClient(conn)
}

// BenchmarkUnary is the root package's BenchmarkUnary with the Redis store:
// one call over bufconn without the interceptor (the baseline, in the same
// run), and with it on Redis for first executions (a fresh key per call) and
// replays (one key), by 1 caller and by 64 at once.
//
//	go test -run '^$' -bench BenchmarkUnary -benchmem -count 5 .
func BenchmarkUnary(b *testing.B) {
	req := &paymentsv1.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	for _, mode := range []string{"none/baseline", "redis/first", "redis/replay"} {
		for _, par := range []int{1, 64} {
			b.Run(mode+"/p"+strconv.Itoa(par), func(b *testing.B) {
				var store idempotency.Store
				if mode != "none/baseline" {
					c := benchClient(b)
					store = newStore(b, c, testPrefix(b, c))
				}
				client := benchGRPC(b, store)
				var seq atomic.Int64
				key := func() string {
					if mode == "redis/replay" {
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
				b.ResetTimer()
				if par == 1 {
					for b.Loop() {
						call(ctx)
					}
					return
				}
				b.SetParallelism(max(1, par/runtime.GOMAXPROCS(0)))
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						call(ctx)
					}
				})
			})
		}
	}
}
