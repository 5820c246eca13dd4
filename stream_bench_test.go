package idempotency_test

import (
	"context"
	"errors"
	"io"
	"path/filepath"
	"strconv"
	"testing"

	"google.golang.org/grpc/metadata"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/internal/cpuclock"
	testpb "github.com/grpcidem/idempotency/internal/testpb"

	"github.com/grpcidem/idempotency/boltstore"
)

// BenchmarkServerStream measures a 100-message server stream over bufconn:
// without the interceptor (baseline), and with it on bbolt for first
// executions (a fresh key per stream, so one commit each) and replays (one
// key). The target is replay at most 1.2 times baseline.
//
//	go test -run '^$' -bench ServerStream -benchmem -count 5 .
func BenchmarkServerStream(b *testing.B) {
	const messages = 100
	req := &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 100_000, Currency: "EUR", Count: messages}
	for _, mode := range []string{"baseline", "first", "replay"} {
		b.Run("bolt/"+mode, func(b *testing.B) {
			var store idempotency.Store
			if mode != "baseline" {
				s, err := boltstore.Open(filepath.Join(b.TempDir(), "bench.db"))
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { s.Close() })
				store = s
			}
			client := benchClient(b, store)
			seq := 0
			var out testpb.ChargeResponse
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
			cpu, cpuOK := cpuclock.Process()
			b.ResetTimer()
			for b.Loop() {
				run()
			}
			b.StopTimer()
			if now, ok := cpuclock.Process(); ok && cpuOK {
				b.ReportMetric(float64((now-cpu).Microseconds())/float64(b.N), "cpu-µs/op")
			}
		})
	}
}
