package pgstore_test

import (
	"testing"

	"github.com/grpcidem/idempotency/internal/admintest"
)

// The idempotency command's forget, through the admin service of a running
// server on a PostgreSQL store, makes the next call with the key run again;
// a running key is refused without -force.
func TestAdminCLIForget(t *testing.T) {
	_, _, s := setup(t)
	admintest.CheckForget(t, s)
}
