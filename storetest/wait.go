package storetest

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
)

type waitResult struct {
	err error
	at  time.Time
}

// startWait calls Wait in a goroutine and delivers its result.
func startWait(ctx context.Context, st idempotency.Store, key string, seen idempotency.Entry) <-chan waitResult {
	done := make(chan waitResult, 1)
	go func() {
		err := st.Wait(ctx, key, seen)
		done <- waitResult{err: err, at: time.Now()}
	}()
	return done
}

// wantBlocked checks that a Wait has not returned: nothing it waits for
// has happened yet.
func wantBlocked(t *testing.T, what string, done <-chan waitResult) {
	t.Helper()
	select {
	case r := <-done:
		t.Fatalf("%s: Wait returned %v although the key is still pending under the token seen, with a live lease", what, r.err)
	default:
	}
}

// wantReturn waits up to within for a Wait to return and gives its result.
func wantReturn(t *testing.T, what string, done <-chan waitResult, within time.Duration) waitResult {
	t.Helper()
	timer := time.NewTimer(within)
	defer timer.Stop()
	select {
	case r := <-done:
		return r
	case <-timer.C:
	}
	// A result that came in with the timer counts.
	select {
	case r := <-done:
		return r
	default:
		t.Fatalf("%s: Wait has not returned after %v", what, within)
		panic("unreachable")
	}
}

// wantWoken waits for a Wait that a change of the key must end.
func (s *suite) wantWoken(t *testing.T, what string, done <-chan waitResult) {
	t.Helper()
	r := wantReturn(t, what, done, s.patience())
	if r.err != nil {
		t.Fatalf("%s: Wait returned %v, want nil", what, r.err)
	}
}

// pendingEntry reserves key with stA under lease and returns the owner's
// token and the Pending entry that a Reserve with stB then sees.
func pendingEntry(t *testing.T, stA, stB idempotency.Store, key string, lease time.Duration) (string, idempotency.Entry) {
	t.Helper()
	tok := newToken()
	wantAcquired(t, "Reserve", reserve(t, stA, key, tok, nil, lease), tok)
	seen := reserve(t, stB, key, newToken(), nil, lease)
	wantPendingUnder(t, "Reserve by another token", seen, tok)
	return tok, seen
}

// checkWaitWoken starts a Wait on stB for a key that stA holds, then has
// the holder end it with change, and checks that the Wait returns nil
// promptly: long before the lease would have run out.
func (s *suite) checkWaitWoken(t *testing.T, stA, stB idempotency.Store, name string, change func(key, token string) error) {
	t.Helper()
	key := newKey("wait-" + name)
	tok, seen := pendingEntry(t, stA, stB, key, longLease)
	done := startWait(t.Context(), stB, key, seen)
	s.pause()
	wantBlocked(t, "before "+name, done)
	wantOK(t, name, change(key, tok))
	s.wantWoken(t, "after "+name, done)
}

func testWaitComplete(t *testing.T, s *suite) {
	st := s.open(t)
	s.checkWaitWoken(t, st, st, "Complete", func(key, tok string) error {
		return complete(t, st, key, tok, []byte("done"), longRetention)
	})
}

func testWaitRelease(t *testing.T, s *suite) {
	st := s.open(t)
	s.checkWaitWoken(t, st, st, "Release", func(key, tok string) error {
		return release(t, st, key, tok)
	})
}

func testWaitLeaseExpiry(t *testing.T, s *suite) {
	st := s.open(t)
	short := s.shortLease()
	for try := 1; ; try++ {
		key, tok := newKey("wait-lease-expiry"), newToken()
		start := time.Now()
		wantAcquired(t, "Reserve under a short lease", reserve(t, st, key, tok, nil, short), tok)
		seen := reserve(t, st, key, newToken(), nil, longLease)
		if seen.State == idempotency.Acquired {
			if elapsed := time.Since(start); elapsed < short-s.tolerance {
				t.Fatalf("Reserve by another token %v after the first acquired the key under a %v lease: %s, want pending", elapsed, short, describe(seen))
			}
			if try < tries {
				t.Logf("try %d: the %v lease ran out before the second Reserve; trying again", try, short)
				continue
			}
			t.Fatalf("the %v lease ran out before the second Reserve %d times: the machine is too slow for this test; use storetest.TimeScale", short, tries)
		}
		wantPendingUnder(t, "Reserve by another token", seen, tok)

		done := startWait(t.Context(), st, key, seen)
		r := wantReturn(t, "Wait for a lease to run out", done, time.Until(seen.LeaseExpires)+s.patience())
		if r.err != nil {
			t.Fatalf("Wait for a lease to run out: %v, want nil", r.err)
		}
		if late := r.at.Sub(seen.LeaseExpires); late > s.lateness() {
			t.Fatalf("Wait returned %v after the lease ran out, want at most %v later", late, s.lateness())
		}
		tok2 := newToken()
		eventually(t, "Reserve after Wait", seen.LeaseExpires.Add(s.lateness()), func() (bool, string) {
			e := reserve(t, st, key, tok2, nil, longLease)
			if e.State == idempotency.Pending && e.Token == tok {
				return false, describe(e)
			}
			wantAcquired(t, "Reserve after Wait", e, tok2)
			return true, ""
		})
		return
	}
}

func testWaitChangedBeforeWait(t *testing.T, s *suite) {
	st := s.open(t)
	s.checkChangedBeforeWait(t, st, st)
}

// checkChangedBeforeWait changes a key with stA after a Reserve with stB saw
// it pending, and only then calls Wait with stB: Wait must notice the change
// rather than wait for a notification that has already gone by.
func (s *suite) checkChangedBeforeWait(t *testing.T, stA, stB idempotency.Store) {
	t.Helper()
	changes := []struct {
		name   string
		change func(key, tok string) error
	}{
		{"Complete", func(key, tok string) error {
			return complete(t, stA, key, tok, []byte("done"), longRetention)
		}},
		{"Release", func(key, tok string) error {
			return release(t, stA, key, tok)
		}},
		// Pending again, but under another owner: not the state seen.
		{"Release and Reserve by another token", func(key, tok string) error {
			if err := release(t, stA, key, tok); err != nil {
				return err
			}
			tok2 := newToken()
			if e := reserve(t, stA, key, tok2, nil, longLease); e.State != idempotency.Acquired {
				return fmt.Errorf("reserve after Release: got %s, want state acquired", describe(e))
			}
			return nil
		}},
	}
	for _, c := range changes {
		key := newKey("changed-before-wait")
		tok, seen := pendingEntry(t, stA, stB, key, longLease)
		wantOK(t, c.name, c.change(key, tok))
		ctx, cancel := context.WithTimeout(t.Context(), s.patience())
		err := stB.Wait(ctx, key, seen)
		cancel()
		if err != nil {
			t.Fatalf("Wait called after %s: %v, want nil at once", c.name, err)
		}
	}

	// A lease that ran out before Wait was called.
	key := newKey("changed-before-wait-lease")
	tok := newToken()
	wantAcquired(t, "Reserve under a short lease", reserve(t, stA, key, tok, nil, s.shortLease()), tok)
	seen, err := stB.Lookup(t.Context(), key)
	wantOK(t, "Lookup", err)
	switch seen.State {
	case idempotency.Pending:
		sleepUntil(seen.LeaseExpires.Add(s.tolerance))
		ctx, cancel := context.WithTimeout(t.Context(), s.patience())
		defer cancel()
		if err := stB.Wait(ctx, key, seen); err != nil {
			t.Fatalf("Wait called after the lease seen ran out: %v, want nil at once", err)
		}
	case idempotency.Absent:
		// The machine was too slow to see the key pending at all.
	default:
		t.Fatalf("Lookup of a reserved key: got %s, want state pending", describe(seen))
	}
}

func testWaitContextEnds(t *testing.T, s *suite) {
	st := s.open(t)
	key := newKey("wait-context")
	tok, seen := pendingEntry(t, st, st, key, longLease)

	// A deadline.
	timeout := s.shortLease()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	r := wantReturn(t, "Wait with a deadline", startWait(ctx, st, key, seen), timeout+s.patience())
	if !errors.Is(r.err, context.DeadlineExceeded) {
		t.Fatalf("Wait past its context's deadline returned %v, want context.DeadlineExceeded", r.err)
	}

	// A cancellation.
	ctx, cancel = context.WithCancel(t.Context())
	done := startWait(ctx, st, key, seen)
	s.pause()
	wantBlocked(t, "before the context is canceled", done)
	cancel()
	r = wantReturn(t, "Wait after its context was canceled", done, s.patience())
	if !errors.Is(r.err, context.Canceled) {
		t.Fatalf("Wait after its context was canceled returned %v, want context.Canceled", r.err)
	}

	// A context already canceled.
	r = wantReturn(t, "Wait with a canceled context", startWait(ctx, st, key, seen), s.patience())
	if !errors.Is(r.err, context.Canceled) {
		t.Fatalf("Wait with a canceled context returned %v, want context.Canceled", r.err)
	}

	// The waits changed nothing.
	wantPendingUnder(t, "Lookup after the waits", lookup(t, st, key), tok)
}

func testWaitManyWaiters(t *testing.T, s *suite) {
	st := s.open(t)
	s.checkManyWaiters(t, []idempotency.Store{st})
}

// checkManyWaiters has 32 waiters, spread over stores, wait on one key
// until its owner completes it, and 32 more on another until its owner
// releases it: every one of them must wake.
func (s *suite) checkManyWaiters(t *testing.T, stores []idempotency.Store) {
	t.Helper()
	const waiters = 32
	ends := []struct {
		name string
		end  func(st idempotency.Store, key, tok string) error
	}{
		{"Complete", func(st idempotency.Store, key, tok string) error {
			return complete(t, st, key, tok, []byte("done"), longRetention)
		}},
		{"Release", func(st idempotency.Store, key, tok string) error {
			return release(t, st, key, tok)
		}},
	}
	for _, e := range ends {
		key, tok := newKey("many-waiters"), newToken()
		wantAcquired(t, "Reserve", reserve(t, stores[0], key, tok, nil, longLease), tok)
		var dones []<-chan waitResult
		for i := range waiters {
			st := stores[i%len(stores)]
			seen := reserve(t, st, key, newToken(), nil, longLease)
			wantPendingUnder(t, "Reserve by a waiter", seen, tok)
			dones = append(dones, startWait(t.Context(), st, key, seen))
		}
		s.pause()
		for i, done := range dones {
			wantBlocked(t, fmt.Sprintf("waiter %d before %s", i, e.name), done)
		}
		wantOK(t, e.name, e.end(stores[len(stores)-1], key, tok))
		deadline := time.Now().Add(s.patience())
		for i, done := range dones {
			r := wantReturn(t, fmt.Sprintf("waiter %d of %d after %s", i, waiters, e.name), done, time.Until(deadline))
			if r.err != nil {
				t.Fatalf("waiter %d after %s: Wait returned %v, want nil", i, e.name, r.err)
			}
		}
	}
}
