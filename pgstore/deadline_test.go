package pgstore_test

import (
	"context"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
)

// TestCallerDeadlineDuringReserve: the database is 150 ms away in each
// direction (a proxy delays every byte), so a Reserve takes at least 300 ms,
// and callers give up before it returns. Before, the Reserve was cut off
// with the caller's context, yet the statement still reached the database
// and committed: the key stayed held under the dead call's token for the
// whole lease, and every retry waited for it or timed out. Now:
//
//   - one call with a 100 ms deadline fails with DeadlineExceeded, and an
//     immediate retry with the same key executes at once, exactly once;
//   - a storm of 30 calls with one key and deadlines of 0 to 150 ms, none of
//     which can get an answer, runs the handler never (no caller was alive
//     when its reservation came back, so each reservation was released
//     unused), and leaves the key free: the next call with a normal
//     deadline executes within a few seconds (no stall of a lease length,
//     20 s here), exactly once; no two executions of the key ever overlap.
func TestCallerDeadlineDuringReserve(t *testing.T) {
	const (
		oneWay = 150 * time.Millisecond
		lease  = 20 * time.Second
		prompt = 5 * time.Second // far more than a few round trips, far less than the lease
	)
	proxy := newDelayProxy(t)
	admin := newPool(t, nil)
	pool := newPool(t, func(c *pgxpool.Config) { proxy.via(c); c.MaxConns = 8 })
	table := newTable(t, admin)
	store := newStore(t, pool, table)
	svc := &faultPayments{store: store}
	client := bufService(t, store, svc, idempotency.WithLease(lease))
	ctx := t.Context()

	// Connections and prepared statements, made while the database is
	// near, so that the delay is the only slow thing.
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			k := idempotency.NewKey()
			charge(ctx, client, k)
			charge(ctx, client, k)
		})
	}
	wg.Wait()
	proxy.setDelay(oneWay)
	t.Cleanup(func() { proxy.setDelay(0) })

	// final is the call with a normal deadline after callers gave up: it
	// must execute promptly and once.
	final := func(t *testing.T, k string) {
		t.Helper()
		start := time.Now()
		fctx, cancel := context.WithTimeout(ctx, lease/2)
		defer cancel()
		r := charge(fctx, client, k, idempotency.WithMaxAttempts(1))
		took := time.Since(start)
		if r.err != nil || r.replayed {
			t.Fatalf("the call after the callers gave up: %v (after %v), replayed %v; want a fresh execution", r.err, took.Round(time.Millisecond), r.replayed)
		}
		if took > prompt {
			t.Fatalf("the call after the callers gave up took %v; want well under the %v lease", took.Round(time.Millisecond), lease)
		}
		if n := svc.runsOf(k); n != 1 {
			t.Fatalf("the handler ran %d times for the key, want 1", n)
		}
		if m := svc.maxInFlight.Load(); m > 1 {
			t.Fatalf("%d executions ran at once", m)
		}
		again := charge(ctx, client, k, idempotency.WithMaxAttempts(1))
		if again.err != nil || !again.replayed || again.resp.ChargeId != r.resp.ChargeId {
			t.Fatalf("replay: %v, replayed %v", again.err, again.replayed)
		}
		t.Logf("the call after the callers gave up executed in %v", took.Round(time.Millisecond))
	}

	t.Run("one call", func(t *testing.T) {
		k := idempotency.NewKey()
		dctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		r := charge(dctx, client, k, idempotency.WithMaxAttempts(1))
		cancel()
		if status.Code(r.err) != codes.DeadlineExceeded {
			t.Fatalf("call with a 100ms deadline: %v, want DeadlineExceeded", r.err)
		}
		final(t, k)
	})

	t.Run("storm", func(t *testing.T) {
		k := idempotency.NewKey()
		var wg sync.WaitGroup
		errs := make([]error, 30)
		for i := range errs {
			d := time.Duration(rand.N(151)) * time.Millisecond
			wg.Go(func() {
				dctx, cancel := context.WithTimeout(ctx, d)
				defer cancel()
				errs[i] = charge(dctx, client, k, idempotency.WithMaxAttempts(1)).err
			})
		}
		wg.Wait()
		for i, err := range errs {
			// No answer can come back in time; the caller sees its
			// deadline, or Aborted if the server noticed it first.
			if c := status.Code(err); c != codes.DeadlineExceeded && c != codes.Aborted {
				t.Fatalf("storm call %d: %v, want DeadlineExceeded", i, err)
			}
		}
		if n := svc.runsOf(k); n != 0 {
			t.Fatalf("the handler ran %d times for callers that had all given up", n)
		}
		final(t, k)
	})
}
