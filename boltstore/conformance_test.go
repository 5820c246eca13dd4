package boltstore_test

import (
	"errors"
	"testing"

	"go.uber.org/goleak"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/storetest"
)

// Every test stops what it started: the stores' committers, sweepers and
// probes.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestConformance runs the shared Store suite, with the check of held
// leases that only a store in the owner's process can pass.
func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		s, err := boltstore.Open(t.TempDir() + "/x.db")
		if err != nil {
			t.Fatalf("boltstore.Open: %v", err)
		}
		t.Cleanup(func() {
			// The suite's Close case may have closed it already.
			if err := s.Close(); err != nil && !errors.Is(err, idempotency.ErrClosed) {
				t.Errorf("Close: %v", err)
			}
		})
		return s
	}, storetest.HeldLeases())
}
