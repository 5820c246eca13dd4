package memstore_test

import (
	"errors"
	"testing"

	"go.uber.org/goleak"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/memstore"
	"github.com/grpcidem/idempotency/storetest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestConformance runs the shared Store suite, with the check of held
// leases that only a store in the owner's process can pass.
func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		s := memstore.New()
		t.Cleanup(func() {
			if err := s.Close(); err != nil && !errors.Is(err, idempotency.ErrClosed) {
				t.Errorf("Close: %v", err)
			}
		})
		return s
	}, storetest.HeldLeases())
}
