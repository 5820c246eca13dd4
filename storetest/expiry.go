package storetest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
)

// waitLeaseOut waits until key, reserved under owner, no longer reports
// pending under owner's token to Lookup.
func (s *suite) waitLeaseOut(t *testing.T, st idempotency.Store, key string, owner idempotency.Entry) {
	t.Helper()
	sleepUntil(owner.LeaseExpires)
	eventually(t, "Lookup after the lease ran out", owner.LeaseExpires.Add(s.lateness()), func() (bool, string) {
		e := lookup(t, st, key)
		if e.State == idempotency.Pending && e.Token == owner.Token {
			return false, describe(e)
		}
		wantState(t, "Lookup after the lease ran out", e, idempotency.Absent)
		return true, ""
	})
}

// takeOver reserves key under a short lease with stA, waits it out and
// takes the key over with stB under a long lease. It returns the stale
// owner's and the new owner's tokens.
func (s *suite) takeOver(t *testing.T, stA, stB idempotency.Store, key string) (stale, fresh string) {
	t.Helper()
	stale, fresh = newToken(), newToken()
	owner := reserve(t, stA, key, stale, nil, s.shortLease())
	wantAcquired(t, "Reserve under a short lease", owner, stale)
	sleepUntil(owner.LeaseExpires)
	eventually(t, "Reserve by another token after the lease ran out", owner.LeaseExpires.Add(s.lateness()), func() (bool, string) {
		e := reserve(t, stB, key, fresh, nil, longLease)
		if e.State == idempotency.Pending && e.Token == stale {
			return false, describe(e)
		}
		wantAcquired(t, "Reserve by another token after the lease ran out", e, fresh)
		return true, ""
	})
	return stale, fresh
}

func testCompleteAfterLeaseRanOut(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, rec := newKey("complete-after-lease"), newToken(), randomBytes(64)
	owner := reserve(t, st, key, tok, nil, s.shortLease())
	wantAcquired(t, "Reserve under a short lease", owner, tok)
	s.waitLeaseOut(t, st, key, owner)
	// Nobody took the key over, so the late owner's outcome is kept.
	wantOK(t, "Complete by the owner after its lease ran out, nobody having taken over", complete(t, st, key, tok, rec, longRetention))
	wantCompleted(t, "Lookup after the late Complete", lookup(t, st, key), rec)
	wantCompleted(t, "Reserve after the late Complete", reserve(t, st, key, newToken(), nil, longLease), rec)
}

func testLeaseExpiredIsAbsent(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok := newKey("lease-expired"), newToken()
	owner := reserve(t, st, key, tok, newFingerprint(), s.shortLease())
	wantAcquired(t, "Reserve under a short lease", owner, tok)
	s.waitLeaseOut(t, st, key, owner)
	tok2 := newToken()
	wantAcquired(t, "Reserve after the lease ran out", reserve(t, st, key, tok2, nil, longLease), tok2)
}

func testLeaseTakeover(t *testing.T, s *suite) {
	st := s.open(t)
	key := newKey("lease-takeover")
	_, fresh := s.takeOver(t, st, st, key)
	wantPendingUnder(t, "Lookup after the takeover", lookup(t, st, key), fresh)
	wantPendingUnder(t, "Reserve after the takeover", reserve(t, st, key, newToken(), nil, longLease), fresh)
}

func testLeaseStaleOwnerFenced(t *testing.T, s *suite) {
	st := s.open(t)
	s.checkFencing(t, st, st)
}

// checkFencing takes a key over from a stale owner on stA with stB, and
// checks that the stale owner can change nothing any more.
func (s *suite) checkFencing(t *testing.T, stA, stB idempotency.Store) {
	t.Helper()
	key := newKey("fencing")
	stale, fresh := s.takeOver(t, stA, stB, key)
	before := lookup(t, stB, key)
	wantPendingUnder(t, "Lookup after the takeover", before, fresh)

	wantNotOwner(t, "Complete by the stale owner", complete(t, stA, key, stale, []byte("stale"), longRetention))
	wantNotOwner(t, "Renew by the stale owner", renew(t, stA, key, stale, 3*longLease))
	wantNotOwner(t, "Release by the stale owner", release(t, stA, key, stale))
	after := lookup(t, stB, key)
	wantPendingUnder(t, "Lookup after the stale owner's refused calls", after, fresh)
	s.wantTime(t, "the new owner's LeaseExpires after the stale owner's refused calls", after.LeaseExpires, before.LeaseExpires, before.LeaseExpires)

	rec := randomBytes(128)
	wantOK(t, "Complete by the new owner", complete(t, stB, key, fresh, rec, longRetention))
	wantNotOwner(t, "Complete by the stale owner after the new owner's", complete(t, stA, key, stale, []byte("stale"), longRetention))
	wantCompleted(t, "Lookup after the stale owner's late Complete", lookup(t, stB, key), rec)
	wantCompleted(t, "Reserve after the stale owner's late Complete", reserve(t, stA, key, newToken(), nil, longLease), rec)
}

func testRetentionExpiredIsAbsent(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, rec := newKey("retention"), newToken(), randomBytes(64)
	retention := s.shortRetention()
	reserve(t, st, key, tok, nil, longLease)
	before := time.Now()
	wantOK(t, "Complete under a short retention", complete(t, st, key, tok, rec, retention))
	e := lookup(t, st, key)
	switch {
	case e.State == idempotency.Completed:
		wantCompleted(t, "Lookup right after Complete", e, rec)
		s.wantTime(t, "Expires", e.Expires, before.Add(retention), time.Now().Add(retention))
	case e.State == idempotency.Absent && time.Since(before) >= retention-s.tolerance:
		// The machine was slow enough for the record to expire already.
	default:
		t.Fatalf("Lookup right after Complete: got %s, want state completed", describe(e))
	}

	// No sweep need have run: an expired record is absent as soon as it
	// expires, whatever the store's housekeeping.
	sleepUntil(before.Add(retention))
	eventually(t, "Lookup after the retention", before.Add(retention+s.lateness()), func() (bool, string) {
		e := lookup(t, st, key)
		if e.State == idempotency.Completed {
			return false, describe(e)
		}
		wantState(t, "Lookup after the retention", e, idempotency.Absent)
		return true, ""
	})
	tok2, rec2 := newToken(), randomBytes(64)
	wantAcquired(t, "Reserve after the retention", reserve(t, st, key, tok2, nil, longLease), tok2)
	wantOK(t, "Complete by the new owner", complete(t, st, key, tok2, rec2, longRetention))
	wantCompleted(t, "Lookup after the new owner's Complete", lookup(t, st, key), rec2)
}

// testLeaseHeldNeverRunsOut: a held lease outlives its length (its owner is
// alive as long as the process is): it is neither absent nor taken over,
// its waiters keep waiting, and it ends with its owner's Release.
func testLeaseHeldNeverRunsOut(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, short := newKey("lease-held"), newToken(), s.shortLease()
	claim := idempotency.Claim{Token: tok, Lease: short, Held: true}
	e, err := st.Reserve(ownerCtx(t.Context(), key, tok), key, claim)
	if err != nil {
		t.Fatalf("Reserve of a held lease: %v", err)
	}
	wantAcquired(t, "Reserve of a held lease", e, tok)
	seen := reserve(t, st, key, newToken(), nil, longLease)
	wantPendingUnder(t, "Reserve by another token", seen, tok)

	waited := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 4*short)
		defer cancel()
		waited <- st.Wait(ctx, key, seen)
	}()
	sleepUntil(time.Now().Add(3 * short))
	wantPendingUnder(t, "Lookup of a held lease three lease lengths later", lookup(t, st, key), tok)
	wantPendingUnder(t, "Reserve of a held lease three lease lengths later", reserve(t, st, key, newToken(), nil, longLease), tok)
	if err := <-waited; !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Wait on a held lease past its length: %v, want it to wait until its context ends", err)
	}
	wantOK(t, "Release by the owner", release(t, st, key, tok))
	wantState(t, "Lookup after Release", lookup(t, st, key), idempotency.Absent)
}
