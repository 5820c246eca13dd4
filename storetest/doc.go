// Package storetest is the conformance suite for idempotency.Store: every
// rule in the Store documentation, checked against a real store. The stores
// in this module run it, and so should any Store of your own:
//
//	func TestMyStore(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) idempotency.Store { return openMyStore(t) })
//	}
//
// newStore is called once per subtest (twice or more for the cross-instance
// ones) and must return a working store; it registers its own cleanup with
// t.Cleanup. That cleanup must tolerate a store the suite has already closed:
// the Close subtest closes its store itself, and a second Close may return
// idempotency.ErrClosed.
//
// Subtests run in parallel and use fresh random keys, so a store backed by a
// shared server (Redis, PostgreSQL) need not start empty. If two stores from
// two newStore calls see the same keys, pass SharedBackend to also check that
// instances reserve, fence and wake each other's waiters. A store that keeps
// its leases in this process (and so honours idempotency.Claim.Held) passes
// HeldLeases, to check that a held lease never runs out by the clock. The
// suite's leases
// and retentions are a few hundred milliseconds; TimeScale stretches them for
// a backend whose clock is coarse, and ClockTolerance widens how far the
// times a store reports may stray from the suite's clock.
//
// A store that implements the optional idempotency.Inspector (for the admin
// service) is checked for it too: listing by prefix in pages, binary-safe and
// in store-key order (pass UnorderedListing if the store documents another
// order), forgetting a pending key only when forced, forgetting a record so
// that the next Reserve acquires, and its Summary. For other stores those
// subtests skip.
package storetest
