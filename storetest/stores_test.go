package storetest_test

import (
	"errors"
	"testing"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/storetest"

	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/memstore"
)

// closeStore closes s when the test ends; the Close subtest may have closed
// it already.
func closeStore(t *testing.T, s idempotency.Store) {
	t.Cleanup(func() {
		if err := s.Close(); err != nil && !errors.Is(err, idempotency.ErrClosed) {
			t.Errorf("Close: %v", err)
		}
	})
}

func TestMemoryStore(t *testing.T) {
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		s := memstore.New()
		closeStore(t, s)
		return s
	}, storetest.HeldLeases())
}

func TestBoltStore(t *testing.T) {
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		s, err := boltstore.Open(t.TempDir() + "/x.db")
		if err != nil {
			t.Fatalf("OpenBolt: %v", err)
		}
		closeStore(t, s)
		return s
	}, storetest.HeldLeases())
}
