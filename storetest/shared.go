package storetest

import (
	"testing"

	"github.com/grpcidem/idempotency"
)

func testSharedSeeEachOther(t *testing.T, s *suite) {
	st := s.openShared(t, 2)
	a, b := st[0], st[1]
	key, tok, fp, rec := newKey("shared-see"), newToken(), newFingerprint(), randomBytes(500)
	owner := reserve(t, a, key, tok, fp, longLease)
	wantAcquired(t, "Reserve on instance A", owner, tok)
	s.wantPending(t, "Lookup on instance B", lookup(t, b, key), owner, fp)
	s.wantPending(t, "Reserve on instance B", reserve(t, b, key, newToken(), nil, longLease), owner, fp)
	wantOK(t, "Complete on instance A", complete(t, a, key, tok, rec, longRetention))
	wantCompleted(t, "Lookup on instance B after Complete on A", lookup(t, b, key), rec)
	wantCompleted(t, "Reserve on instance B after Complete on A", reserve(t, b, key, newToken(), nil, longLease), rec)

	// The owner may finish on another instance than it started on: the
	// token, not the connection, owns the key.
	key, tok = newKey("shared-release"), newToken()
	wantAcquired(t, "Reserve on instance A", reserve(t, a, key, tok, nil, longLease), tok)
	wantOK(t, "Renew on instance B", renew(t, b, key, tok, longLease))
	wantOK(t, "Release on instance B", release(t, b, key, tok))
	wantState(t, "Lookup on instance A after Release on B", lookup(t, a, key), idempotency.Absent)
}

func testSharedWaitComplete(t *testing.T, s *suite) {
	st := s.openShared(t, 2)
	s.checkWaitWoken(t, st[0], st[1], "Complete on another instance", func(key, tok string) error {
		return complete(t, st[0], key, tok, []byte("done"), longRetention)
	})
}

func testSharedWaitRelease(t *testing.T, s *suite) {
	st := s.openShared(t, 2)
	s.checkWaitWoken(t, st[0], st[1], "Release on another instance", func(key, tok string) error {
		return release(t, st[0], key, tok)
	})
}

func testSharedChangedBeforeWait(t *testing.T, s *suite) {
	st := s.openShared(t, 2)
	s.checkChangedBeforeWait(t, st[0], st[1])
}

func testSharedManyWaiters(t *testing.T, s *suite) {
	s.checkManyWaiters(t, s.openShared(t, 3))
}

func testSharedOneWinner(t *testing.T, s *suite) {
	s.checkOneWinner(t, s.openShared(t, 4))
}

func testSharedStaleOwnerFenced(t *testing.T, s *suite) {
	st := s.openShared(t, 2)
	s.checkFencing(t, st[0], st[1])
}

func testSharedCloseLeavesOthers(t *testing.T, s *suite) {
	st := s.openShared(t, 2)
	a, b := st[0], st[1]
	key, tok := newKey("shared-close"), newToken()
	wantAcquired(t, "Reserve on instance A", reserve(t, a, key, tok, nil, longLease), tok)
	wantOK(t, "Close of instance A", a.Close())

	wantPendingUnder(t, "Lookup on instance B after A closed", lookup(t, b, key), tok)
	rec := randomBytes(100)
	wantOK(t, "Complete on instance B of a key reserved on A", complete(t, b, key, tok, rec, longRetention))
	wantCompleted(t, "Lookup on instance B", lookup(t, b, key), rec)
	key, tok = newKey("shared-close-after"), newToken()
	wantAcquired(t, "Reserve on instance B after A closed", reserve(t, b, key, tok, nil, longLease), tok)
	wantOK(t, "Release on instance B after A closed", release(t, b, key, tok))
}
