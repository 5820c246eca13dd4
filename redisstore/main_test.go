package redisstore_test

import (
	"os"
	"testing"

	"go.uber.org/goleak"
)

// Every test closes its stores and clients: no goroutine of a Store's
// subscriber may outlive them. A child replica (see child_test.go) serves
// instead of running tests.
func TestMain(m *testing.M) {
	if name := os.Getenv(childEnv); name != "" {
		serveChild(name)
		return
	}
	goleak.VerifyTestMain(m)
}
