package storetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
)

// An Option changes how Run checks a store.
type Option func(*config)

// SharedBackend declares that two stores returned by two newStore calls see
// the same keys, as replicas do that share one Redis or PostgreSQL. Run then
// also checks that reserves race, fencing holds and waiters wake across
// instances, and that closing one instance leaves the others working.
func SharedBackend() Option {
	return func(c *config) { c.shared = true }
}

// TimeScale multiplies every lease, retention and grace period of the suite
// by factor (1 by default), for a backend that keeps time in coarse steps or
// runs far away. factor must be positive.
func TimeScale(factor float64) Option {
	return func(c *config) { c.scale = factor }
}

// ClockTolerance is how far a time the store reports (LeaseExpires,
// Expires) may stray from the time the suite expects, to allow for a store
// that rounds times or runs on another machine's clock. The default is one
// second; d must not be negative.
func ClockTolerance(d time.Duration) Option {
	return func(c *config) { c.tolerance = d }
}

// HeldLeases declares that the store keeps its leases in this process's
// memory and so honours Claim.Held: a held lease ends with Complete or
// Release, never by the clock. Run then also checks that a held lease is
// never taken over and that its waiters wait for its owner, however late
// the clock says it is. The memory and bbolt stores pass it; a store shared
// between processes cannot.
func HeldLeases() Option {
	return func(c *config) { c.held = true }
}

type config struct {
	held      bool
	shared    bool
	unordered bool
	scale     float64
	tolerance time.Duration
}

// Run checks newStore's stores against the Store contract, in parallel
// subtests of one subtest named "storetest", and returns when they have all
// finished.
func Run(t *testing.T, newStore func(t *testing.T) idempotency.Store, opts ...Option) {
	t.Helper()
	if newStore == nil {
		t.Fatal("storetest.Run: newStore is nil")
	}
	s := &suite{config: config{scale: 1, tolerance: time.Second}, newStore: newStore}
	for _, opt := range opts {
		if opt != nil {
			opt(&s.config)
		}
	}
	if !(s.scale > 0) || s.scale > 1000 {
		t.Fatalf("storetest.Run: TimeScale(%v): the factor must be in (0, 1000]", s.scale)
	}
	if s.tolerance < 0 {
		t.Fatalf("storetest.Run: ClockTolerance(%v): the tolerance must not be negative", s.tolerance)
	}
	// The group subtest returns only when its parallel subtests are done,
	// so that a caller's deferred checks (goroutine leaks, a shared
	// server's teardown) run after the whole suite.
	t.Run("storetest", func(t *testing.T) {
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				if c.shared && !s.shared {
					t.Skip("needs two instances on one backend: pass storetest.SharedBackend() if newStore's stores share keys")
				}
				if c.held && !s.held {
					t.Skip("for stores that keep leases in this process: pass storetest.HeldLeases() if the store honours Claim.Held")
				}
				t.Parallel()
				c.run(t, s)
			})
		}
	})
}

var cases = []struct {
	name    string
	shared  bool
	held    bool
	inspect bool // skipped for stores that do not implement idempotency.Inspector
	run     func(*testing.T, *suite)
}{
	{name: "Reserve/Absent", run: testReserveAbsent},
	{name: "Reserve/Pending", run: testReservePending},
	{name: "Reserve/Completed", run: testReserveCompleted},
	{name: "Lookup/Absent", run: testLookupAbsent},
	{name: "Lookup/Pending", run: testLookupPending},
	{name: "Lookup/Completed", run: testLookupCompleted},
	{name: "Release/MakesAbsent", run: testReleaseMakesAbsent},
	{name: "Release/WrongToken", run: testReleaseWrongToken},
	{name: "Release/NotPending", run: testReleaseNotPending},
	{name: "Release/AfterLeaseRanOut", run: testReleaseAfterLeaseRanOut},
	{name: "Renew/WrongToken", run: testRenewWrongToken},
	{name: "Renew/TakesBackAbsent", run: testRenewTakesBackAbsent},
	{name: "Renew/NotAfterComplete", run: testRenewNotAfterComplete},
	{name: "Renew/ExtendsLease", run: testRenewExtendsLease},
	{name: "Complete/WrongToken", run: testCompleteWrongToken},
	{name: "Complete/AfterCompleted", run: testCompleteAfterCompleted},
	{name: "Complete/AbsentKey", run: testCompleteAbsentKey},
	{name: "Complete/AfterLeaseRanOut", run: testCompleteAfterLeaseRanOut},
	{name: "Lease/ExpiredIsAbsent", run: testLeaseExpiredIsAbsent},
	{name: "Lease/Takeover", run: testLeaseTakeover},
	{name: "Lease/StaleOwnerFenced", run: testLeaseStaleOwnerFenced},
	{name: "Lease/HeldNeverRunsOut", held: true, run: testLeaseHeldNeverRunsOut},
	{name: "Retention/ExpiredIsAbsent", run: testRetentionExpiredIsAbsent},
	{name: "Wait/Complete", run: testWaitComplete},
	{name: "Wait/Release", run: testWaitRelease},
	{name: "Wait/LeaseExpiry", run: testWaitLeaseExpiry},
	{name: "Wait/ChangedBeforeWait", run: testWaitChangedBeforeWait},
	{name: "Wait/ContextEnds", run: testWaitContextEnds},
	{name: "Wait/ManyWaiters", run: testWaitManyWaiters},
	{name: "Concurrency/OneWinner", run: testConcurrencyOneWinner},
	{name: "Concurrency/ManyKeys", run: testConcurrencyManyKeys},
	{name: "Bounds/Durations", run: testBoundsDurations},
	{name: "Bounds/KeyTooLong", run: testBoundsKeyTooLong},
	{name: "Data/LargeRecords", run: testDataLargeRecords},
	{name: "Data/EmptyRecord", run: testDataEmptyRecord},
	{name: "Data/EmptyKey", run: testDataEmptyKey},
	{name: "Data/EmptyToken", run: testDataEmptyToken},
	{name: "Data/BinaryKeys", run: testDataBinaryKeys},
	{name: "Data/BinaryValues", run: testDataBinaryValues},
	{name: "Data/ReturnedSlicesAreCallers", run: testDataReturnedSlices},
	{name: "Close/ErrClosed", run: testCloseErrClosed},
	{name: "Inspector/List", inspect: true, run: testInspectList},
	{name: "Inspector/ForgetPending", inspect: true, run: testInspectForgetPending},
	{name: "Inspector/ForgetCompleted", inspect: true, run: testInspectForgetCompleted},
	{name: "Inspector/Summary", inspect: true, run: testInspectSummary},
	{name: "Inspector/ExpiredIsAbsent", inspect: true, run: testInspectExpiredIsAbsent},
	{name: "Inspector/ListBinaryPrefix", inspect: true, run: testInspectListBinaryPrefix},
	{name: "Inspector/PageTokenOtherPrefix", inspect: true, run: testInspectPageTokenOtherPrefix},
	{name: "Shared/SeeEachOther", shared: true, run: testSharedSeeEachOther},
	{name: "Shared/WaitComplete", shared: true, run: testSharedWaitComplete},
	{name: "Shared/WaitRelease", shared: true, run: testSharedWaitRelease},
	{name: "Shared/ChangedBeforeWait", shared: true, run: testSharedChangedBeforeWait},
	{name: "Shared/ManyWaiters", shared: true, run: testSharedManyWaiters},
	{name: "Shared/OneWinner", shared: true, run: testSharedOneWinner},
	{name: "Shared/StaleOwnerFenced", shared: true, run: testSharedStaleOwnerFenced},
	{name: "Shared/CloseLeavesOthers", shared: true, run: testSharedCloseLeavesOthers},
}

type suite struct {
	config
	newStore func(t *testing.T) idempotency.Store
}

// Leases and retentions the suite never waits out.
const (
	longLease     = 10 * time.Minute
	longRetention = time.Hour
)

// tries bounds how often a timing-sensitive setup is redone when the machine
// was too slow for it to mean anything, before the suite gives up.
const tries = 5

func (s *suite) scaled(d time.Duration) time.Duration {
	return time.Duration(float64(d) * s.scale)
}

// shortLease and shortRetention are what the suite does wait out.
func (s *suite) shortLease() time.Duration     { return s.scaled(250 * time.Millisecond) }
func (s *suite) shortRetention() time.Duration { return s.scaled(300 * time.Millisecond) }

// lateness is how long after a lease or record is due to expire the store
// may still report it: "not much later", yet generous on a loaded machine.
func (s *suite) lateness() time.Duration { return s.scaled(3*time.Second) + s.tolerance }

// patience bounds how long a notification may take to arrive, or a
// condition to become true, before the suite calls it lost.
func (s *suite) patience() time.Duration { return s.scaled(10 * time.Second) }

// pause gives a goroutine time to block before the suite acts. Nothing
// depends on it being long enough: a store must pass either way.
func (s *suite) pause() { time.Sleep(s.scaled(50 * time.Millisecond)) }

func (s *suite) open(t *testing.T) idempotency.Store {
	t.Helper()
	st := s.newStore(t)
	if st == nil {
		t.Fatal("storetest: newStore returned a nil Store")
	}
	return st
}

// openShared returns n stores from n newStore calls, which SharedBackend
// says see the same keys.
func (s *suite) openShared(t *testing.T, n int) []idempotency.Store {
	t.Helper()
	stores := make([]idempotency.Store, n)
	for i := range stores {
		stores[i] = s.open(t)
	}
	return stores
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails, by crypto/rand's contract
	return b
}

// newKey returns a key no earlier run can have left in a shared backend.
func newKey(name string) string {
	return "storetest/" + hex.EncodeToString(randomBytes(12)) + "/" + name
}

func newToken() string { return hex.EncodeToString(randomBytes(16)) }

func newFingerprint() []byte { return randomBytes(32) }

// ownerCtx is the context the interceptors give a Store's changing methods:
// it carries the owner's Execution. Complete and Release get it without its
// cancellation, as the interceptors pass it.
func ownerCtx(ctx context.Context, key, token string) context.Context {
	return idempotency.ContextWithExecution(ctx, &idempotency.Execution{
		Method:   "/storetest.Conformance/Call",
		Key:      key,
		StoreKey: key,
		Token:    token,
	})
}

func reserve(t *testing.T, st idempotency.Store, key, token string, fingerprint []byte, lease time.Duration) idempotency.Entry {
	t.Helper()
	e, err := st.Reserve(ownerCtx(t.Context(), key, token), key, idempotency.Claim{Token: token, Fingerprint: fingerprint, Lease: lease})
	if err != nil {
		t.Fatalf("Reserve(%s): %v", quote(key), err)
	}
	return e
}

func lookup(t *testing.T, st idempotency.Store, key string) idempotency.Entry {
	t.Helper()
	e, err := st.Lookup(t.Context(), key)
	if err != nil {
		t.Fatalf("Lookup(%s): %v", quote(key), err)
	}
	return e
}

func complete(t *testing.T, st idempotency.Store, key, token string, record []byte, retention time.Duration) error {
	t.Helper()
	return st.Complete(context.WithoutCancel(ownerCtx(t.Context(), key, token)), key, token, record, retention)
}

func release(t *testing.T, st idempotency.Store, key, token string) error {
	t.Helper()
	return st.Release(context.WithoutCancel(ownerCtx(t.Context(), key, token)), key, token)
}

func renew(t *testing.T, st idempotency.Store, key, token string, lease time.Duration) error {
	t.Helper()
	return st.Renew(ownerCtx(t.Context(), key, token), key, idempotency.Claim{Token: token, Lease: lease})
}

func wantOK(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v, want nil", what, err)
	}
}

func wantNotOwner(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, idempotency.ErrNotOwner) {
		t.Fatalf("%s: %v, want ErrNotOwner", what, err)
	}
}

func wantState(t *testing.T, what string, e idempotency.Entry, want idempotency.State) {
	t.Helper()
	if e.State != want {
		t.Fatalf("%s: got %s, want state %s", what, describe(e), want)
	}
}

func wantAcquired(t *testing.T, what string, e idempotency.Entry, token string) {
	t.Helper()
	wantState(t, what, e, idempotency.Acquired)
	if e.Token != token {
		t.Fatalf("%s: Acquired with Token %q, want the claim's token %q", what, e.Token, token)
	}
}

// wantPending checks that e reports the key pending under owner, the Entry
// with which owner acquired it, whose claim carried fingerprint.
func (s *suite) wantPending(t *testing.T, what string, e, owner idempotency.Entry, fingerprint []byte) {
	t.Helper()
	wantState(t, what, e, idempotency.Pending)
	if e.Token != owner.Token {
		t.Fatalf("%s: Pending under token %q, want the owner's token %q", what, e.Token, owner.Token)
	}
	if !bytes.Equal(e.Fingerprint, fingerprint) {
		t.Fatalf("%s: Pending with Fingerprint %x, want the owner's fingerprint %x", what, e.Fingerprint, fingerprint)
	}
	s.wantTime(t, what+": Pending LeaseExpires", e.LeaseExpires, owner.LeaseExpires, owner.LeaseExpires)
}

// wantPendingUnder checks only the owner, for a lease that may have been
// renewed since owner acquired it.
func wantPendingUnder(t *testing.T, what string, e idempotency.Entry, token string) {
	t.Helper()
	wantState(t, what, e, idempotency.Pending)
	if e.Token != token {
		t.Fatalf("%s: Pending under token %q, want %q", what, e.Token, token)
	}
}

func wantCompleted(t *testing.T, what string, e idempotency.Entry, record []byte) {
	t.Helper()
	wantState(t, what, e, idempotency.Completed)
	if !bytes.Equal(e.Record, record) {
		t.Fatalf("%s: Completed with a record that differs from the one stored: %s", what, diff(e.Record, record))
	}
}

// wantTime checks that got, a time the store reported, lies between lo and
// hi, give or take the clock tolerance.
func (s *suite) wantTime(t *testing.T, what string, got, lo, hi time.Time) {
	t.Helper()
	if got.IsZero() {
		t.Fatalf("%s is not set", what)
	}
	if got.Before(lo.Add(-s.tolerance)) || got.After(hi.Add(s.tolerance)) {
		t.Fatalf("%s = %s, want between %s and %s (clock tolerance %v)",
			what, got.Format(time.RFC3339Nano), lo.Format(time.RFC3339Nano), hi.Format(time.RFC3339Nano), s.tolerance)
	}
}

// eventually polls cond until it holds or deadline passes; cond returns
// whether it holds and, if not, what it saw instead.
func eventually(t *testing.T, what string, deadline time.Time, cond func() (bool, string)) {
	t.Helper()
	for {
		ok, saw := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still %s at %s", what, saw, deadline.Format(time.RFC3339Nano))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sleepUntil sleeps until the local clock is past at.
func sleepUntil(at time.Time) {
	if d := time.Until(at); d > 0 {
		time.Sleep(d)
	}
}

// describe formats an Entry without dumping a large record.
func describe(e idempotency.Entry) string {
	switch e.State {
	case idempotency.Acquired, idempotency.Pending:
		return fmt.Sprintf("%s{Token: %q, Fingerprint: %x, LeaseExpires: %s}",
			e.State, e.Token, e.Fingerprint, e.LeaseExpires.Format(time.RFC3339Nano))
	case idempotency.Completed:
		return fmt.Sprintf("%s{Record: %s, Expires: %s}", e.State, abbrev(e.Record), e.Expires.Format(time.RFC3339Nano))
	}
	return e.State.String()
}

func abbrev(b []byte) string {
	if len(b) <= 16 {
		return fmt.Sprintf("%d bytes %x", len(b), b)
	}
	return fmt.Sprintf("%d bytes %x...", len(b), b[:16])
}

func diff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("got %s, want %s", abbrev(got), abbrev(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("both %d bytes, first difference at byte %d: got %#02x, want %#02x", len(got), i, got[i], want[i])
		}
	}
	return "equal"
}

// quote prints a key that may hold any bytes, shortened if it is long.
func quote(key string) string {
	if len(key) > 80 {
		return fmt.Sprintf("%q...(%d bytes)", key[:80], len(key))
	}
	return fmt.Sprintf("%q", key)
}
