package idempotency_test

import (
	"testing"

	"go.uber.org/goleak"
)

// Every test stops what it started: servers, stores, their sweepers and
// committers, lease timers and replay readers.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
