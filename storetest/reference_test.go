package storetest_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/storetest"
)

// The reference store is the simplest Store that keeps the contract: one
// mutex, one map, and a channel per pending key that is closed when the key
// stops being pending under its token. It lets the suite be tested without
// any real store, and, with a bug switched on (see bugs_test.go), shows that
// the suite catches each kind of mistake a real store could make.

type refBackend struct {
	bugs map[string]bool
	mu   sync.Mutex
	keys map[string]*refKey
}

type refKey struct {
	token       string
	fingerprint []byte
	leaseEnds   time.Time
	completed   bool
	record      []byte
	expires     time.Time
	// changed is closed when the key stops being pending under token.
	changed chan struct{}
}

func newRefBackend(bugs map[string]bool) *refBackend {
	return &refBackend{bugs: bugs, keys: make(map[string]*refKey)}
}

// live returns what key holds now, dropping it if it has expired.
func (b *refBackend) live(key string, now time.Time) *refKey {
	k := b.keys[key]
	switch {
	case k == nil:
		return nil
	case k.completed && !now.Before(k.expires) && !b.bugs["no-retention-expiry"]:
	case !k.completed && !now.Before(k.leaseEnds) && !b.bugs["no-lease-expiry"]:
		close(k.changed)
	default:
		return k
	}
	delete(b.keys, key)
	return nil
}

func (b *refBackend) mapKey(key string) string {
	if b.bugs["nul-truncates-key"] {
		if i := strings.IndexByte(key, 0); i >= 0 {
			return key[:i]
		}
	}
	return key
}

func (b *refBackend) clone(p []byte) []byte {
	if b.bugs["shares-slices"] {
		return p
	}
	return bytes.Clone(p)
}

func (b *refBackend) entry(k *refKey) idempotency.Entry {
	if k.completed {
		e := idempotency.Entry{State: idempotency.Completed, Record: b.clone(k.record), Expires: k.expires}
		if b.bugs["expires-unset"] {
			e.Expires = time.Time{}
		}
		return e
	}
	e := idempotency.Entry{State: idempotency.Pending, Token: k.token, Fingerprint: b.clone(k.fingerprint), LeaseExpires: k.leaseEnds}
	if b.bugs["drops-fingerprint"] {
		e.Fingerprint = nil
	}
	return e
}

type refStore struct {
	b         *refBackend
	closed    chan struct{}
	closeOnce sync.Once
}

func (b *refBackend) open() *refStore {
	return &refStore{b: b, closed: make(chan struct{})}
}

func (s *refStore) isClosed() bool {
	if s.b.bugs["ignores-close"] {
		return false
	}
	select {
	case <-s.closed:
		return true
	default:
		return false
	}
}

// check refuses a store key or a duration (named what) that a Store must
// refuse.
func (b *refBackend) check(key, what string, d time.Duration) error {
	if b.bugs["no-bounds"] {
		return nil
	}
	if err := idempotency.CheckStoreKey(key); err != nil {
		return err
	}
	return idempotency.CheckDuration(what, d)
}

func (s *refStore) Reserve(ctx context.Context, key string, claim idempotency.Claim) (idempotency.Entry, error) {
	if s.isClosed() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	if claim.Token == "" && !s.b.bugs["no-bounds"] {
		return idempotency.Entry{}, errors.New("reference store: a claim needs a token")
	}
	if err := s.b.check(key, "Claim.Lease", claim.Lease); err != nil {
		return idempotency.Entry{}, err
	}
	b, key := s.b, s.b.mapKey(key)
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	if k := b.live(key, now); k != nil {
		return b.entry(k), nil
	}
	if b.bugs["racy-reserve"] {
		// Check, then set, with a gap in between: what a store without an
		// atomic compare-and-set does.
		b.mu.Unlock()
		time.Sleep(time.Millisecond)
		b.mu.Lock()
	}
	k := &refKey{token: claim.Token, fingerprint: bytes.Clone(claim.Fingerprint), leaseEnds: now.Add(claim.Lease), changed: make(chan struct{})}
	b.keys[key] = k
	return idempotency.Entry{State: idempotency.Acquired, Token: k.token, LeaseExpires: k.leaseEnds}, nil
}

func (s *refStore) Renew(ctx context.Context, key string, claim idempotency.Claim) error {
	if s.isClosed() {
		return idempotency.ErrClosed
	}
	if claim.Token == "" && !s.b.bugs["no-bounds"] {
		return errors.New("reference store: a claim needs a token")
	}
	if err := s.b.check(key, "Claim.Lease", claim.Lease); err != nil {
		return err
	}
	b, key := s.b, s.b.mapKey(key)
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	k := b.live(key, now)
	if k == nil {
		if b.bugs["renew-no-takeback"] {
			return idempotency.ErrNotOwner
		}
		b.keys[key] = &refKey{token: claim.Token, fingerprint: bytes.Clone(claim.Fingerprint), leaseEnds: now.Add(claim.Lease), changed: make(chan struct{})}
		return nil
	}
	if k.completed || (k.token != claim.Token && !b.bugs["renew-ignores-token"]) {
		return idempotency.ErrNotOwner
	}
	if !b.bugs["renew-does-nothing"] {
		k.leaseEnds = now.Add(claim.Lease)
	}
	return nil
}

func (s *refStore) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	if s.isClosed() {
		return idempotency.ErrClosed
	}
	if err := s.b.check(key, "retention", retention); err != nil {
		return err
	}
	b, key := s.b, s.b.mapKey(key)
	b.mu.Lock()
	defer b.mu.Unlock()
	k := b.live(key, time.Now())
	switch {
	case k == nil:
		if b.bugs["refuses-absent-complete"] {
			return idempotency.ErrNotOwner
		}
	case k.completed || k.token != token:
		if !b.bugs["no-fencing"] {
			return idempotency.ErrNotOwner
		}
	}
	if k != nil && !k.completed && !b.bugs["complete-no-wake"] {
		close(k.changed)
	}
	if b.bugs["truncates-records"] && len(record) > 1<<20 {
		record = record[:1<<20]
	}
	b.keys[key] = &refKey{completed: true, record: record, expires: time.Now().Add(retention)}
	return nil
}

func (s *refStore) Release(ctx context.Context, key, token string) error {
	if s.isClosed() {
		return idempotency.ErrClosed
	}
	b, key := s.b, s.b.mapKey(key)
	b.mu.Lock()
	defer b.mu.Unlock()
	var k *refKey
	if b.bugs["release-ignores-expiry"] {
		// What a store does that finds the key without asking whether
		// its lease has run out.
		k = b.keys[key]
	} else {
		k = b.live(key, time.Now())
	}
	if k == nil || (k.completed && !b.bugs["release-ignores-token"]) {
		return idempotency.ErrNotOwner
	}
	if k.token != token && !b.bugs["release-ignores-token"] {
		return idempotency.ErrNotOwner
	}
	if !k.completed && !b.bugs["release-no-wake"] {
		close(k.changed)
	}
	delete(b.keys, key)
	return nil
}

func (s *refStore) Lookup(ctx context.Context, key string) (idempotency.Entry, error) {
	if s.isClosed() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	b, key := s.b, s.b.mapKey(key)
	b.mu.Lock()
	defer b.mu.Unlock()
	if k := b.live(key, time.Now()); k != nil {
		return b.entry(k), nil
	}
	return idempotency.Entry{State: idempotency.Absent}, nil
}

func (s *refStore) Wait(ctx context.Context, key string, seen idempotency.Entry) error {
	if s.isClosed() {
		return idempotency.ErrClosed
	}
	b, key := s.b, s.b.mapKey(key)
	b.mu.Lock()
	k := b.live(key, time.Now())
	var changed chan struct{}
	switch {
	case k == nil || k.completed:
		if !b.bugs["misses-earlier-change"] {
			b.mu.Unlock()
			return nil
		}
	case k.token != seen.Token:
		if !b.bugs["misses-earlier-change"] && !b.bugs["wait-ignores-token"] {
			b.mu.Unlock()
			return nil
		}
		if b.bugs["wait-ignores-token"] {
			changed = k.changed
		}
	default:
		changed = k.changed
	}
	b.mu.Unlock()

	var leaseEnds <-chan time.Time
	if !b.bugs["wait-ignores-lease"] {
		timer := time.NewTimer(time.Until(seen.LeaseExpires))
		defer timer.Stop()
		leaseEnds = timer.C
	}
	done := ctx.Done()
	if b.bugs["wait-ignores-context"] {
		done = nil
	}
	select {
	case <-changed:
		return nil
	case <-leaseEnds:
		return nil
	case <-done:
		return ctx.Err()
	case <-s.closed:
		return idempotency.ErrClosed
	}
}

func (s *refStore) Close() error {
	err := idempotency.ErrClosed
	s.closeOnce.Do(func() {
		close(s.closed)
		err = nil
	})
	return err
}

// refBugs are the bugs that STORETEST_REFERENCE_BUGS (comma-separated)
// switches on; bugs_test.go sets it in a child process.
func refBugs() map[string]bool {
	bugs := make(map[string]bool)
	for _, name := range strings.Split(os.Getenv("STORETEST_REFERENCE_BUGS"), ",") {
		if name != "" {
			bugs[name] = true
		}
	}
	return bugs
}

func closeAtCleanup(t *testing.T, s idempotency.Store) idempotency.Store {
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestReference(t *testing.T) {
	bugs := refBugs()
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		return closeAtCleanup(t, newRefBackend(bugs).open())
	})
}

func TestReferenceShared(t *testing.T) {
	bugs := refBugs()
	backend := newRefBackend(bugs)
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		if bugs["not-shared"] {
			return closeAtCleanup(t, newRefBackend(bugs).open())
		}
		return closeAtCleanup(t, backend.open())
	}, storetest.SharedBackend())
}
