package redisstore_test

import (
	"testing"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/grpcidem/idempotency/storetest"
)

// TestConformance runs the shared Store suite. Every store it opens has its
// own client (so its own pool and subscriber) on one prefix of one Redis, as
// replicas do.
func TestConformance(t *testing.T) {
	c := newClient(t)
	prefix := testPrefix(t, c)
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		s, err := redisstore.New(newClient(t), redisstore.WithPrefix(prefix))
		if err != nil {
			t.Fatalf("redisstore.New: %v", err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	}, storetest.SharedBackend())
}
