// Package inproc holds what the stores that serve one process (memstore,
// boltstore) share: a sharded table of the leases of running first
// executions, kept in memory, and a bounded table of recent records.
package inproc

import (
	"bytes"
	"context"
	"errors"
	"hash/maphash"
	"slices"
	"sync"
	"time"

	"github.com/grpcidem/idempotency"
)

// Table holds the leases of keys being executed, in memory, for the
// stores that serve one process (memory and bbolt). A Lease needs no
// durability there: when the process dies, its leases die with it, which is
// exactly what a Lease running out means. So the bbolt store writes to disk
// once per first execution, when the record is complete.
//
// The table is sharded by key so that unrelated keys do not contend; a store
// keeps whatever else it needs per key (the memory store's records) in the
// same shard, under the same lock, so that its operations are atomic.
type Table[T any] struct {
	seed   maphash.Seed
	Shards [NumShards]Shard[T]
}

const NumShards = 64

type Shard[T any] struct {
	Mu     sync.Mutex
	Leases map[string]*Lease
	Extra  T // guarded by mu
}

type Lease struct {
	Token       string
	fingerprint []byte   // the claim's, copied into fpBuf when it fits
	fpBuf       [32]byte // room for a SHA-256 fingerprint, the interceptors'
	Expires     time.Time
	Length      time.Duration // the claim's Lease
	// held is set for a idempotency.Claim.Held: the owner runs in this process and ends
	// the Lease itself, so the clock never ends it.
	Held bool
	// completing is set while the owner's record is being written: the
	// Lease is not taken over then, however late it is.
	Completing bool
	// done is closed when the Lease ends; made on the first Wait.
	done chan struct{}
}

func (t *Table[T]) Init() {
	t.seed = maphash.MakeSeed()
	for i := range t.Shards {
		t.Shards[i].Leases = make(map[string]*Lease)
	}
}

func (t *Table[T]) Shard(key string) *Shard[T] {
	return &t.Shards[maphash.String(t.seed, key)%NumShards]
}

// live returns the Lease on key that still holds it, ending one that ran out.
// The shard's lock must be held.
func (s *Shard[T]) Live(key string, now time.Time) *Lease {
	l := s.Leases[key]
	if l == nil {
		return nil
	}
	if l.runsOut() && !now.Before(l.Expires) {
		s.End(key, l)
		return nil
	}
	return l
}

// runsOut reports whether the clock can end l.
func (l *Lease) runsOut() bool { return !l.Completing && !l.Held }

// unhold makes l a Lease that runs out by the clock, one Lease length from
// now: what is left of a held Lease whose owner could not save its outcome,
// so that duplicates wait instead of running again at once. Its waiters are
// woken to wait again, now with a timer. The shard's lock must be held.
func (l *Lease) Unhold(now time.Time) {
	l.Held, l.Completing = false, false
	l.Expires = now.Add(l.Length)
	if l.done != nil {
		close(l.done)
		l.done = nil
	}
}

// acquire makes key pending under c. The shard's lock must be held.
func (s *Shard[T]) Acquire(key string, c idempotency.Claim, now time.Time) idempotency.Entry {
	l := &Lease{Token: c.Token, Expires: now.Add(c.Lease), Length: c.Lease, Held: c.Held}
	if c.Fingerprint != nil {
		// A copy, as the claim's belongs to the caller, in the Lease's
		// own allocation.
		l.fingerprint = append(l.fpBuf[:0], c.Fingerprint...)
	}
	s.Leases[key] = l
	return idempotency.Entry{State: idempotency.Acquired, Token: l.Token, LeaseExpires: l.Expires}
}

// end removes l from key and wakes its waiters. The shard's lock must be held.
func (s *Shard[T]) End(key string, l *Lease) {
	if s.Leases[key] == l {
		delete(s.Leases, key)
	}
	if l.done != nil {
		close(l.done)
		l.done = nil
	}
}

func (l *Lease) pending() idempotency.Entry {
	return idempotency.Entry{State: idempotency.Pending, Token: l.Token, Fingerprint: bytes.Clone(l.fingerprint), LeaseExpires: l.Expires}
}

// records finds the live record of a key for a store that keeps its leases
// in a Table.
type Source[T any] interface {
	// Record returns the live record of key; the shard's lock is held.
	Record(sh *Shard[T], key string, now time.Time) (idempotency.Entry, bool, error)
	// Acquirable returns an error if no key may be acquired now (the
	// store could not save an outcome).
	Acquirable() error
}

// state is Reserve (c set) and Lookup (c nil) for the stores that keep
// their leases here: a live Lease, else a record, else the key is absent, or
// acquired for c. It all happens under the shard's lock, so that a key can
// never be acquired twice; a record being written is under a completing Lease
// until it is visible, so it is seen as pending meanwhile.
func (t *Table[T]) State(src Source[T], key string, c *idempotency.Claim) (idempotency.Entry, error) {
	sh := t.Shard(key)
	now := time.Now()
	sh.Mu.Lock()
	defer sh.Mu.Unlock()
	if l := sh.Live(key, now); l != nil {
		return l.pending(), nil
	}
	e, found, err := src.Record(sh, key, now)
	switch {
	case err != nil:
		return idempotency.Entry{}, err
	case found:
		return e, nil
	case c == nil:
		return idempotency.Entry{State: idempotency.Absent}, nil
	}
	if err := src.Acquirable(); err != nil {
		return idempotency.Entry{}, err
	}
	return sh.Acquire(key, *c, now), nil
}

// renew extends the Lease on key held by c.Token, or takes an absent key
// back under c.
func (t *Table[T]) Renew(src Source[T], key string, c idempotency.Claim) error {
	sh := t.Shard(key)
	now := time.Now()
	sh.Mu.Lock()
	defer sh.Mu.Unlock()
	if l := sh.Leases[key]; l != nil && l.Token == c.Token {
		// A Lease that ran out is still its owner's until someone
		// takes it over.
		if !l.Completing {
			l.Expires, l.Length = now.Add(c.Lease), c.Lease
		}
		return nil
	}
	if sh.Live(key, now) != nil {
		return idempotency.ErrNotOwner
	}
	_, found, err := src.Record(sh, key, now)
	switch {
	case err != nil:
		return err
	case found:
		return idempotency.ErrNotOwner
	}
	if err := src.Acquirable(); err != nil {
		return err
	}
	sh.Acquire(key, c, now)
	return nil
}

// release ends the Lease on key held by token. A lease that ran out holds
// nothing: the key is absent, as in every store, and Release of it is
// refused.
func (t *Table[T]) Release(key, token string) error {
	s := t.Shard(key)
	s.Mu.Lock()
	defer s.Mu.Unlock()
	l := s.Live(key, time.Now())
	if l == nil || l.Token != token || l.Completing {
		return idempotency.ErrNotOwner
	}
	s.End(key, l)
	return nil
}

// wait blocks until the Lease seen on key ends, runs out, or ctx ends.
func (t *Table[T]) Wait(ctx context.Context, key string, seen idempotency.Entry) error {
	s := t.Shard(key)
	s.Mu.Lock()
	l := s.Leases[key]
	if l == nil || l.Token != seen.Token {
		s.Mu.Unlock()
		return nil
	}
	now := time.Now()
	if l.runsOut() && !now.Before(l.Expires) {
		s.Mu.Unlock()
		return nil
	}
	if l.done == nil {
		l.done = make(chan struct{})
	}
	done, runsOut, expires := l.done, l.runsOut(), l.Expires
	s.Mu.Unlock()

	var timeout <-chan time.Time
	if runsOut {
		// Renewals move the expiry on; waking at the old one costs one
		// more Reserve, which finds the Lease live and waits again.
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

type Records struct {
	M     map[string]*Rec
	queue []queued // insertion order, for dropping the oldest
	head  int
	// byExpiry is a min-heap of the records by expiry, so that expired
	// records go first when the store is full, and go at all.
	byExpiry []queued
	seq      uint64
}

type Rec struct {
	Data    []byte
	Expires time.Time
	seq     uint64
}

// queued is a record's place in the insertion queue and the expiry heap;
// it is stale once the record it names was replaced or dropped (seq differs).
type queued struct {
	key     string
	seq     uint64
	expires time.Time
}

// Get returns the live record of key; the shard's lock must be held.
func (r *Records) Get(key string, now time.Time) *Rec {
	rec := r.M[key]
	if rec != nil && !now.Before(rec.Expires) {
		delete(r.M, key)
		return nil
	}
	return rec
}

// Put stores a record, then drops what must go: expired records first,
// then, while the shard is over limit, the oldest. The shard's lock must be
// held.
func (r *Records) Put(key string, data []byte, expires, now time.Time, limit int) {
	r.seq++
	r.M[key] = &Rec{Data: data, Expires: expires, seq: r.seq}
	q := queued{key, r.seq, expires}
	r.queue = append(r.queue, q)
	r.pushExpiry(q)
	for len(r.byExpiry) > 0 && !now.Before(r.byExpiry[0].expires) {
		r.drop(r.popExpiry())
	}
	// Under the limit, the oldest is not looked up: a look-up of a key
	// written long ago misses the caches on every first execution. Stale
	// entries at the head go when over the limit, or in compact.
	for r.head < len(r.queue) && len(r.M) > limit {
		q := r.queue[r.head]
		r.drop(q)
		r.queue[r.head] = queued{}
		r.head++
	}
	r.compact()
}

// live reports whether q names the record that key holds now.
func (r *Records) live(q queued) bool {
	rec := r.M[q.key]
	return rec != nil && rec.seq == q.seq
}

func (r *Records) drop(q queued) {
	if r.live(q) {
		delete(r.M, q.key)
	}
}

// compact keeps the queue and the heap within a small multiple of the
// records they order, dropping their stale entries.
func (r *Records) compact() {
	if r.head > 64 && r.head > len(r.queue)/2 {
		n := copy(r.queue, r.queue[r.head:])
		clear(r.queue[n:])
		r.queue = r.queue[:n]
		r.head = 0
	}
	if len(r.queue)-r.head > 2*len(r.M)+64 {
		r.queue = slices.DeleteFunc(r.queue[r.head:], func(q queued) bool { return !r.live(q) })
		r.head = 0
	}
	if len(r.byExpiry) > 2*len(r.M)+64 {
		live := slices.DeleteFunc(r.byExpiry, func(q queued) bool { return !r.live(q) })
		r.byExpiry = live[:0:len(live)]
		for _, q := range live {
			r.pushExpiry(q)
		}
	}
}

func (r *Records) pushExpiry(q queued) {
	h := append(r.byExpiry, q)
	for i := len(h) - 1; i > 0; {
		p := (i - 1) / 2
		if !h[i].expires.Before(h[p].expires) {
			break
		}
		h[i], h[p] = h[p], h[i]
		i = p
	}
	r.byExpiry = h
}

func (r *Records) popExpiry() queued {
	h := r.byExpiry
	top := h[0]
	last := len(h) - 1
	h[0] = h[last]
	h[last] = queued{}
	h = h[:last]
	for i := 0; ; {
		l, small := 2*i+1, i
		if l < len(h) && h[l].expires.Before(h[small].expires) {
			small = l
		}
		if l+1 < len(h) && h[l+1].expires.Before(h[small].expires) {
			small = l + 1
		}
		if small == i {
			break
		}
		h[i], h[small] = h[small], h[i]
		i = small
	}
	r.byExpiry = h
	return top
}

func (r *Rec) Entry() idempotency.Entry {
	return idempotency.Entry{State: idempotency.Completed, Record: bytes.Clone(r.Data), Expires: r.Expires}
}

// Len returns how many records r holds, expired ones included until they are
// dropped. The shard's lock must be held.
func (r *Records) Len() int { return len(r.M) }

// Reset drops every record. The shard's lock must be held.
func (r *Records) Reset() {
	r.M = make(map[string]*Rec)
	r.queue, r.head, r.byExpiry = nil, 0, nil
}

// CheckClaim and CheckRecord are idempotency.CheckStoreKey and
// idempotency.CheckDuration on what a Reserve or Renew, and a Complete, are
// given. CheckClaim also refuses a claim without a token, which names no
// owner, as the Redis and PostgreSQL stores do.
func CheckClaim(key string, c idempotency.Claim) error {
	if err := idempotency.CheckStoreKey(key); err != nil {
		return err
	}
	if c.Token == "" {
		return errors.New("idempotency: a claim needs a non-empty Token")
	}
	return idempotency.CheckDuration("Claim.Lease", c.Lease)
}

func CheckRecord(key string, retention time.Duration) error {
	if err := idempotency.CheckStoreKey(key); err != nil {
		return err
	}
	return idempotency.CheckDuration("retention", retention)
}
