package redisstore_test

import (
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/grpcidem/idempotency/storetest"
)

// The times in an Entry are the local clock plus a PTTL that Redis measured
// at some point during the request, so they are off by up to the request's
// latency, pool wait included. With 64 concurrent Reserves on a loaded
// machine under -race that passes the suite's default tolerance of a second.
const clockTolerance = 3 * time.Second

// TestConformance runs the shared Store suite. Every store it opens has its
// own client (so its own pool and subscriber) on one prefix of one Redis, as
// replicas do.
func TestConformance(t *testing.T) { forEachMode(t, testConformance) }

func testConformance(t *testing.T, m storeMode) {
	c := newClient(t)
	prefix := testPrefix(t, c)
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		s, err := redisstore.New(newClient(t), m.with(redisstore.WithPrefix(prefix))...)
		if err != nil {
			t.Fatalf("redisstore.New: %v", err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	}, storetest.SharedBackend(), storetest.ClockTolerance(clockTolerance), storetest.UnorderedListing())
}
