package redisstore_test

import (
	"testing"

	"go.uber.org/goleak"
)

// Every test closes its stores and clients: no goroutine of a Store's
// subscriber may outlive them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
