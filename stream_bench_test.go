package idempotency_test

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	paymentsv1 "github.com/grpcidem/idempotency/proto/payments/v1"
)

// streamBenchPayments sends its installments at once, with ids that cost
// nothing to make, so that the benchmark measures the interceptor, the store
// and the transport rather than the handler.
type streamBenchPayments struct {
	paymentsv1.UnimplementedPaymentServiceServer
}

func (streamBenchPayments) ChargeInstallments(req *paymentsv1.InstallmentsRequest, ss grpc.ServerStreamingServer[paymentsv1.ChargeResponse]) error {
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

// streamBenchClient serves streamBenchPayments on bufconn, with the stream
// interceptor on store (none when store is nil).
func streamBenchClient(b *testing.B, store idempotency.Store) paymentsv1.PaymentServiceClient {
	b.Helper()
	lis := bufconn.Listen(1 << 20)
	var opts []grpc.ServerOption
	if store != nil {
		opts = append(opts, grpc.StreamInterceptor(idempotency.StreamServerInterceptor(store)))
	}
	srv := grpc.NewServer(opts...)
	paymentsv1.RegisterPaymentServiceServer(srv, streamBenchPayments{})
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

// BenchmarkServerStream measures a 100-message server stream over bufconn:
// without the interceptor (baseline), and with it on bbolt for first
// executions (a fresh key per stream, so one commit each) and replays (one
// key). The target is replay at most 1.3 times baseline.
//
//	go test -run '^$' -bench ServerStream -benchmem -count 5 .
func BenchmarkServerStream(b *testing.B) {
	const messages = 100
	req := &paymentsv1.InstallmentsRequest{Account: "acct_1", AmountCents: 100_000, Currency: "EUR", Count: messages}
	for _, mode := range []string{"baseline", "first", "replay"} {
		b.Run("bolt/"+mode, func(b *testing.B) {
			var store idempotency.Store
			if mode != "baseline" {
				s, err := idempotency.OpenBolt(filepath.Join(b.TempDir(), "bench.db"))
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { s.Close() })
				store = s
			}
			client := streamBenchClient(b, store)
			seq := 0
			var out paymentsv1.ChargeResponse
			run := func() (replayed bool) {
				ctx := context.Background()
				switch mode {
				case "first":
					seq++
					ctx = metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, "k-"+strconv.Itoa(seq))
				case "replay":
					ctx = metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, "the-one-key")
				}
				stream, err := client.ChargeInstallments(ctx, req)
				if err != nil {
					b.Fatal(err)
				}
				n := 0
				for {
					err := stream.RecvMsg(&out)
					if errors.Is(err, io.EOF) {
						break
					}
					if err != nil {
						b.Fatal(err)
					}
					n++
				}
				if n != messages {
					b.Fatalf("got %d messages, want %d", n, messages)
				}
				header, err := stream.Header()
				if err != nil {
					b.Fatal(err)
				}
				return idempotency.IsReplayed(header)
			}
			run() // warm up the connection, and store the replayed record
			if run() != (mode == "replay") {
				b.Fatalf("%s: the stream's replayed header is wrong", mode)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				run()
			}
		})
	}
}
