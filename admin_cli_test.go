package idempotency_test

import (
	"testing"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/internal/admintest"
)

// The idempotency command's forget, through the admin service of a running
// server, makes the next call with the key run again, on the memory and
// bbolt stores; a running key is refused without -force.
func TestAdminCLIForget(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t testing.TB) idempotency.Store) {
		admintest.CheckForget(t, newStore(t))
	})
}
