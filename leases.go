package idempotency

import (
	"bytes"
	"context"
	"hash/maphash"
	"sync"
	"time"
)

// leaseTable holds the leases of keys being executed, in memory, for the
// stores that serve one process (memory and bbolt). A lease needs no
// durability there: when the process dies, its leases die with it, which is
// exactly what a lease running out means. So the bbolt store writes to disk
// once per first execution, when the record is complete.
//
// The table is sharded by key so that unrelated keys do not contend; a store
// keeps whatever else it needs per key (the memory store's records) in the
// same shard, under the same lock, so that its operations are atomic.
type leaseTable[T any] struct {
	seed   maphash.Seed
	shards [leaseShards]leaseShard[T]
}

const leaseShards = 64

type leaseShard[T any] struct {
	mu     sync.Mutex
	leases map[string]*lease
	extra  T // guarded by mu
}

type lease struct {
	token       string
	fingerprint []byte
	expires     time.Time
	length      time.Duration // the claim's lease
	// held is set for a Claim.Held: the owner runs in this process and ends
	// the lease itself, so the clock never ends it.
	held bool
	// completing is set while the owner's record is being written: the
	// lease is not taken over then, however late it is.
	completing bool
	// done is closed when the lease ends; made on the first Wait.
	done chan struct{}
}

func (t *leaseTable[T]) init() {
	t.seed = maphash.MakeSeed()
	for i := range t.shards {
		t.shards[i].leases = make(map[string]*lease)
	}
}

func (t *leaseTable[T]) shard(key string) *leaseShard[T] {
	return &t.shards[maphash.String(t.seed, key)%leaseShards]
}

// live returns the lease on key that still holds it, ending one that ran out.
// The shard's lock must be held.
func (s *leaseShard[T]) live(key string, now time.Time) *lease {
	l := s.leases[key]
	if l == nil {
		return nil
	}
	if l.runsOut() && !now.Before(l.expires) {
		s.end(key, l)
		return nil
	}
	return l
}

// runsOut reports whether the clock can end l.
func (l *lease) runsOut() bool { return !l.completing && !l.held }

// unhold makes l a lease that runs out by the clock, one lease length from
// now: what is left of a held lease whose owner could not save its outcome,
// so that duplicates wait instead of running again at once. Its waiters are
// woken to wait again, now with a timer. The shard's lock must be held.
func (l *lease) unhold(now time.Time) {
	l.held, l.completing = false, false
	l.expires = now.Add(l.length)
	if l.done != nil {
		close(l.done)
		l.done = nil
	}
}

// acquire makes key pending under c. The shard's lock must be held.
func (s *leaseShard[T]) acquire(key string, c Claim, now time.Time) Entry {
	l := &lease{token: c.Token, fingerprint: bytes.Clone(c.Fingerprint), expires: now.Add(c.Lease), length: c.Lease, held: c.Held}
	s.leases[key] = l
	return Entry{State: Acquired, Token: l.token, LeaseExpires: l.expires}
}

// end removes l from key and wakes its waiters. The shard's lock must be held.
func (s *leaseShard[T]) end(key string, l *lease) {
	if s.leases[key] == l {
		delete(s.leases, key)
	}
	if l.done != nil {
		close(l.done)
		l.done = nil
	}
}

func (l *lease) pending() Entry {
	return Entry{State: Pending, Token: l.token, Fingerprint: bytes.Clone(l.fingerprint), LeaseExpires: l.expires}
}

// records finds the live record of a key for a store that keeps its leases
// in a leaseTable.
type records[T any] interface {
	// record returns the live record of key; the shard's lock is held.
	record(sh *leaseShard[T], key string, now time.Time) (Entry, bool, error)
	// acquirable returns an error if no key may be acquired now (the
	// store could not save an outcome).
	acquirable() error
}

// state is Reserve (c set) and Lookup (c nil) for the stores that keep
// their leases here: a live lease, else a record, else the key is absent, or
// acquired for c. It all happens under the shard's lock, so that a key can
// never be acquired twice; a record being written is under a completing lease
// until it is visible, so it is seen as pending meanwhile.
func (t *leaseTable[T]) state(src records[T], key string, c *Claim) (Entry, error) {
	sh := t.shard(key)
	now := time.Now()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if l := sh.live(key, now); l != nil {
		return l.pending(), nil
	}
	e, found, err := src.record(sh, key, now)
	switch {
	case err != nil:
		return Entry{}, err
	case found:
		return e, nil
	case c == nil:
		return Entry{State: Absent}, nil
	}
	if err := src.acquirable(); err != nil {
		return Entry{}, err
	}
	return sh.acquire(key, *c, now), nil
}

// renew extends the lease on key held by c.Token, or takes an absent key
// back under c.
func (t *leaseTable[T]) renew(src records[T], key string, c Claim) error {
	sh := t.shard(key)
	now := time.Now()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if l := sh.leases[key]; l != nil && l.token == c.Token {
		// A lease that ran out is still its owner's until someone
		// takes it over.
		if !l.completing {
			l.expires, l.length = now.Add(c.Lease), c.Lease
		}
		return nil
	}
	if sh.live(key, now) != nil {
		return ErrNotOwner
	}
	_, found, err := src.record(sh, key, now)
	switch {
	case err != nil:
		return err
	case found:
		return ErrNotOwner
	}
	if err := src.acquirable(); err != nil {
		return err
	}
	sh.acquire(key, c, now)
	return nil
}

// release ends the lease on key held by token.
func (t *leaseTable[T]) release(key, token string) error {
	s := t.shard(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.leases[key]
	if l == nil || l.token != token || l.completing {
		return ErrNotOwner
	}
	s.end(key, l)
	return nil
}

// wait blocks until the lease seen on key ends, runs out, or ctx ends.
func (t *leaseTable[T]) wait(ctx context.Context, key string, seen Entry) error {
	s := t.shard(key)
	s.mu.Lock()
	l := s.leases[key]
	if l == nil || l.token != seen.Token {
		s.mu.Unlock()
		return nil
	}
	now := time.Now()
	if l.runsOut() && !now.Before(l.expires) {
		s.mu.Unlock()
		return nil
	}
	if l.done == nil {
		l.done = make(chan struct{})
	}
	done, runsOut, expires := l.done, l.runsOut(), l.expires
	s.mu.Unlock()

	var timeout <-chan time.Time
	if runsOut {
		// Renewals move the expiry on; waking at the old one costs one
		// more Reserve, which finds the lease live and waits again.
		timer := time.NewTimer(expires.Sub(now))
		defer timer.Stop()
		timeout = timer.C
	}
	select {
	case <-done:
		return nil
	case <-timeout:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
