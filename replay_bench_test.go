package idempotency_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/memstore"
)

// BenchmarkReplayMetadata measures a unary replay over bufconn of a
// handler that set a header of two keys and a trailer (the tests' payments
// handler), next to BenchmarkUnary's replay of a handler that set none.
//
//	go test -run '^$' -bench BenchmarkReplayMetadata -benchmem -count 5 .
func BenchmarkReplayMetadata(b *testing.B) {
	for _, name := range []string{"memory", "bolt"} {
		b.Run(name, func(b *testing.B) {
			var store idempotency.Store
			if name == "memory" {
				s := memstore.New()
				b.Cleanup(func() { s.Close() })
				store = s
			} else {
				store = openBolt(b, filepath.Join(b.TempDir(), "bench.db"))
			}
			e := newEnv(b, store, envConfig{})
			ctx := withKey(context.Background(), "the-one-key")
			if _, err := e.client.Charge(ctx, chargeReq); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := e.client.Charge(ctx, chargeReq); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
