package storetest

import (
	"bytes"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
)

func testReserveAbsent(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok := newKey("reserve-absent"), newToken()
	before := time.Now()
	e := reserve(t, st, key, tok, newFingerprint(), longLease)
	after := time.Now()
	wantAcquired(t, "Reserve of an absent key", e, tok)
	s.wantTime(t, "Acquired LeaseExpires", e.LeaseExpires, before.Add(longLease), after.Add(longLease))
}

func testReservePending(t *testing.T, s *suite) {
	st := s.open(t)
	key, fp := newKey("reserve-pending"), newFingerprint()
	owner := reserve(t, st, key, newToken(), fp, longLease)
	wantState(t, "first Reserve", owner, idempotency.Acquired)
	e := reserve(t, st, key, newToken(), newFingerprint(), longLease)
	s.wantPending(t, "second Reserve, by another token", e, owner, fp)
	e = reserve(t, st, key, newToken(), nil, longLease)
	s.wantPending(t, "third Reserve, by another token", e, owner, fp)

	// A claim without a fingerprint is reported without one.
	key = newKey("reserve-pending-nil-fingerprint")
	owner = reserve(t, st, key, newToken(), nil, longLease)
	wantState(t, "first Reserve without a fingerprint", owner, idempotency.Acquired)
	e = reserve(t, st, key, newToken(), newFingerprint(), longLease)
	s.wantPending(t, "second Reserve", e, owner, nil)
}

func testReserveCompleted(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, rec := newKey("reserve-completed"), newToken(), randomBytes(4096)
	wantState(t, "first Reserve", reserve(t, st, key, tok, newFingerprint(), longLease), idempotency.Acquired)
	before := time.Now()
	wantOK(t, "Complete by the owner", complete(t, st, key, tok, rec, longRetention))
	after := time.Now()

	e := reserve(t, st, key, newToken(), newFingerprint(), longLease)
	wantCompleted(t, "Reserve after Complete", e, rec)
	s.wantTime(t, "Completed Expires", e.Expires, before.Add(longRetention), after.Add(longRetention))
	// A replay does not use the record up.
	e2 := reserve(t, st, key, newToken(), nil, longLease)
	wantCompleted(t, "second Reserve after Complete", e2, rec)
	s.wantTime(t, "second Reserve's Expires", e2.Expires, e.Expires, e.Expires)
	wantCompleted(t, "Reserve by the former owner's token", reserve(t, st, key, tok, nil, longLease), rec)
}

func testLookupAbsent(t *testing.T, s *suite) {
	st := s.open(t)
	key := newKey("lookup-absent")
	for i := range 2 {
		e, err := st.Lookup(t.Context(), key)
		if err != nil {
			t.Fatalf("Lookup #%d of a key never reserved: %v, want an Absent Entry and a nil error", i+1, err)
		}
		wantState(t, "Lookup of a key never reserved", e, idempotency.Absent)
	}
	// Lookup reserved nothing.
	tok := newToken()
	wantAcquired(t, "Reserve after Lookup", reserve(t, st, key, tok, nil, longLease), tok)
}

func testLookupPending(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, fp := newKey("lookup-pending"), newToken(), newFingerprint()
	owner := reserve(t, st, key, tok, fp, longLease)
	wantState(t, "Reserve", owner, idempotency.Acquired)
	s.wantPending(t, "Lookup of a reserved key", lookup(t, st, key), owner, fp)
	s.wantPending(t, "second Lookup", lookup(t, st, key), owner, fp)
	s.wantPending(t, "Reserve after Lookup", reserve(t, st, key, newToken(), nil, longLease), owner, fp)
	wantOK(t, "Complete by the owner after Lookup", complete(t, st, key, tok, []byte("done"), longRetention))
}

func testLookupCompleted(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, rec := newKey("lookup-completed"), newToken(), randomBytes(300)
	reserve(t, st, key, tok, nil, longLease)
	before := time.Now()
	wantOK(t, "Complete", complete(t, st, key, tok, rec, longRetention))
	after := time.Now()
	e := lookup(t, st, key)
	wantCompleted(t, "Lookup after Complete", e, rec)
	s.wantTime(t, "Lookup's Expires", e.Expires, before.Add(longRetention), after.Add(longRetention))
	wantCompleted(t, "second Lookup", lookup(t, st, key), rec)
}

func testReleaseMakesAbsent(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok := newKey("release"), newToken()
	wantAcquired(t, "Reserve", reserve(t, st, key, tok, newFingerprint(), longLease), tok)
	wantOK(t, "Release by the owner", release(t, st, key, tok))
	wantState(t, "Lookup after Release", lookup(t, st, key), idempotency.Absent)
	tok2 := newToken()
	wantAcquired(t, "Reserve after Release", reserve(t, st, key, tok2, nil, longLease), tok2)
	// The key can go round again, now under the second owner.
	wantOK(t, "Release by the second owner", release(t, st, key, tok2))
	tok3 := newToken()
	wantAcquired(t, "Reserve after the second Release", reserve(t, st, key, tok3, nil, longLease), tok3)
}

func testReleaseWrongToken(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, fp := newKey("release-wrong-token"), newToken(), newFingerprint()
	owner := reserve(t, st, key, tok, fp, longLease)
	wantNotOwner(t, "Release by another token", release(t, st, key, newToken()))
	s.wantPending(t, "Lookup after a refused Release", lookup(t, st, key), owner, fp)
	s.wantPending(t, "Reserve after a refused Release", reserve(t, st, key, newToken(), nil, longLease), owner, fp)
	wantOK(t, "Release by the owner", release(t, st, key, tok))
}

func testReleaseNotPending(t *testing.T, s *suite) {
	st := s.open(t)

	key := newKey("release-absent")
	wantNotOwner(t, "Release of a key never reserved", release(t, st, key, newToken()))
	wantState(t, "Lookup after Release of a key never reserved", lookup(t, st, key), idempotency.Absent)

	key, tok := newKey("release-released"), newToken()
	reserve(t, st, key, tok, nil, longLease)
	wantOK(t, "first Release", release(t, st, key, tok))
	wantNotOwner(t, "second Release by the same token", release(t, st, key, tok))

	key, tok, rec := newKey("release-completed"), newToken(), randomBytes(100)
	reserve(t, st, key, tok, nil, longLease)
	wantOK(t, "Complete", complete(t, st, key, tok, rec, longRetention))
	wantNotOwner(t, "Release of a completed key by its owner", release(t, st, key, tok))
	wantCompleted(t, "Lookup after Release of a completed key", lookup(t, st, key), rec)
	wantNotOwner(t, "Release of a completed key by another token", release(t, st, key, newToken()))
	wantCompleted(t, "Reserve after Release of a completed key", reserve(t, st, key, newToken(), nil, longLease), rec)
}

func testRenewWrongToken(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, fp := newKey("renew-wrong-token"), newToken(), newFingerprint()
	owner := reserve(t, st, key, tok, fp, longLease)
	// A lease far longer than the owner's shows whether anything changed.
	wantNotOwner(t, "Renew by another token", renew(t, st, key, newToken(), 3*longLease))
	s.wantPending(t, "Lookup after a refused Renew", lookup(t, st, key), owner, fp)
	wantOK(t, "Renew by the owner", renew(t, st, key, tok, longLease))
}

// testRenewTakesBackAbsent: an owner whose key became absent (its lease ran
// out and nobody took it, or it was released) takes it back with Renew, under
// its own claim, fingerprint included.
func testRenewTakesBackAbsent(t *testing.T, s *suite) {
	st := s.open(t)

	key, tok, fp := newKey("renew-absent"), newToken(), newFingerprint()
	err := st.Renew(ownerCtx(t.Context(), key, tok), key, idempotency.Claim{Token: tok, Fingerprint: fp, Lease: longLease})
	wantOK(t, "Renew of an absent key", err)
	e := lookup(t, st, key)
	wantPendingUnder(t, "Lookup after Renew of an absent key", e, tok)
	if !bytes.Equal(e.Fingerprint, fp) {
		t.Errorf("Lookup after Renew of an absent key: fingerprint %x, want the claim's %x", e.Fingerprint, fp)
	}
	wantPendingUnder(t, "Reserve by another token after the take-back", reserve(t, st, key, newToken(), nil, longLease), tok)

	key, tok = newKey("renew-released"), newToken()
	reserve(t, st, key, tok, nil, longLease)
	wantOK(t, "Release", release(t, st, key, tok))
	wantOK(t, "Renew by the owner after Release", renew(t, st, key, tok, longLease))
	wantPendingUnder(t, "Lookup after Renew of a released key", lookup(t, st, key), tok)
	wantOK(t, "Complete after the take-back", complete(t, st, key, tok, randomBytes(10), longRetention))
}

func testRenewNotAfterComplete(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, rec := newKey("renew-completed"), newToken(), randomBytes(100)
	reserve(t, st, key, tok, nil, longLease)
	wantOK(t, "Complete", complete(t, st, key, tok, rec, longRetention))
	wantNotOwner(t, "Renew by the owner after Complete", renew(t, st, key, tok, longLease))
	wantNotOwner(t, "Renew by another token after Complete", renew(t, st, key, newToken(), longLease))
	wantCompleted(t, "Lookup after Renew of a completed key", lookup(t, st, key), rec)
}

func testRenewExtendsLease(t *testing.T, s *suite) {
	st := s.open(t)
	short := s.shortLease()
	for try := 1; ; try++ {
		key, tok := newKey("renew-extends"), newToken()
		start := time.Now()
		owner := reserve(t, st, key, tok, nil, short)
		wantAcquired(t, "Reserve", owner, tok)
		renewStart := time.Now()
		err := renew(t, st, key, tok, longLease)
		renewEnd := time.Now()
		if renewEnd.Sub(start) > short/2 {
			// The short lease may have run out before Renew, which
			// then need not succeed: the test proves nothing.
			if try < tries {
				t.Logf("try %d: Reserve and Renew took %v of a %v lease; trying again", try, renewEnd.Sub(start), short)
				continue
			}
			t.Fatalf("Reserve and Renew took %v, more than half the %v lease, %d times: the machine is too slow for this test; use storetest.TimeScale", renewEnd.Sub(start), short, tries)
		}
		wantOK(t, "Renew by the owner within its lease", err)

		// Past the original lease, the key is still the owner's.
		sleepUntil(latest(start.Add(short), owner.LeaseExpires).Add(short / 2))
		e := lookup(t, st, key)
		wantPendingUnder(t, "Lookup after the original lease, renewed", e, tok)
		s.wantTime(t, "renewed LeaseExpires", e.LeaseExpires, renewStart.Add(longLease), renewEnd.Add(longLease))
		wantPendingUnder(t, "Reserve after the original lease, renewed", reserve(t, st, key, newToken(), nil, longLease), tok)
		// A Renew to a shorter lease is honoured too: the lease is
		// "lease from now", not the longest ever granted.
		wantOK(t, "second Renew by the owner", renew(t, st, key, tok, longLease/2))
		before := time.Now()
		e = lookup(t, st, key)
		s.wantTime(t, "LeaseExpires after a Renew to a shorter lease", e.LeaseExpires, before.Add(longLease/2-time.Minute), before.Add(longLease/2))
		return
	}
}

func testCompleteWrongToken(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, fp := newKey("complete-wrong-token"), newToken(), newFingerprint()
	owner := reserve(t, st, key, tok, fp, longLease)
	wantNotOwner(t, "Complete by another token", complete(t, st, key, newToken(), []byte("intruder"), longRetention))
	s.wantPending(t, "Lookup after a refused Complete", lookup(t, st, key), owner, fp)
	rec := randomBytes(64)
	wantOK(t, "Complete by the owner", complete(t, st, key, tok, rec, longRetention))
	wantCompleted(t, "Lookup after the owner's Complete", lookup(t, st, key), rec)
}

func testCompleteAfterCompleted(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, rec := newKey("complete-twice"), newToken(), randomBytes(64)
	reserve(t, st, key, tok, nil, longLease)
	wantOK(t, "Complete by the owner", complete(t, st, key, tok, rec, longRetention))
	wantNotOwner(t, "Complete of a completed key by another token", complete(t, st, key, newToken(), []byte("intruder"), longRetention))
	wantCompleted(t, "Lookup after a refused Complete", lookup(t, st, key), rec)
	wantCompleted(t, "Reserve after a refused Complete", reserve(t, st, key, newToken(), nil, longLease), rec)
}

func testCompleteAbsentKey(t *testing.T, s *suite) {
	st := s.open(t)
	key, rec := newKey("complete-absent"), randomBytes(64)
	wantOK(t, "Complete of a key never reserved", complete(t, st, key, newToken(), rec, longRetention))
	wantCompleted(t, "Lookup after Complete of an absent key", lookup(t, st, key), rec)
	wantCompleted(t, "Reserve after Complete of an absent key", reserve(t, st, key, newToken(), nil, longLease), rec)
}

func latest(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
