package redisstore_test

import (
	"testing"

	"github.com/grpcidem/idempotency/internal/admintest"
)

// The idempotency command's forget, through the admin service of a running
// server on a Redis store, makes the next call with the key run again; a
// running key is refused without -force.
func TestAdminCLIForget(t *testing.T) {
	c := newClient(t)
	admintest.CheckForget(t, newStore(t, c, testPrefix(t, c)))
}
