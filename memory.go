package idempotency

import (
	"bytes"
	"context"
	"slices"
	"sync/atomic"
	"time"
)

// MemoryStore is a Store in process memory: the same semantics as the other
// stores, without durability. Use it in tests, and where losing every record
// on restart is acceptable. Its size is bounded: past the bound, expired
// records go first, then the oldest.
type MemoryStore struct {
	table    leaseTable[memRecords]
	perShard int // records per shard before the oldest is dropped
	closed   atomic.Bool
}

type memRecords struct {
	m     map[string]*memRecord
	queue []queued // insertion order, for dropping the oldest
	head  int
	// byExpiry is a min-heap of the records by expiry, so that expired
	// records go first when the store is full, and go at all.
	byExpiry []queued
	seq      uint64
}

type memRecord struct {
	data    []byte
	expires time.Time
	seq     uint64
}

// queued is a record's place in the insertion queue and the expiry heap;
// it is stale once the record it names was replaced or dropped (seq differs).
type queued struct {
	key     string
	seq     uint64
	expires time.Time
}

// A MemoryOption configures a MemoryStore.
type MemoryOption func(*MemoryStore)

// DefaultMemoryMaxRecords is the default bound of a MemoryStore.
const DefaultMemoryMaxRecords = 1 << 20

// WithMaxRecords bounds how many completed records a MemoryStore keeps; past
// it, expired records are dropped first, then the oldest live ones, whose
// keys then act as never used. The
// bound is applied per shard of the store, so it is approximate. Zero or less
// keeps the default, DefaultMemoryMaxRecords.
func WithMaxRecords(n int) MemoryOption {
	return func(s *MemoryStore) {
		if n > 0 {
			s.perShard = max(1, n/leaseShards)
		}
	}
}

// NewMemoryStore returns an empty MemoryStore.
func NewMemoryStore(opts ...MemoryOption) *MemoryStore {
	s := &MemoryStore{perShard: DefaultMemoryMaxRecords / leaseShards}
	for _, o := range opts {
		o(s)
	}
	s.table.init()
	for i := range s.table.shards {
		s.table.shards[i].extra.m = make(map[string]*memRecord)
	}
	return s
}

var _ Store = (*MemoryStore)(nil)

// record returns the live record of key; the shard's lock must be held.
func (r *memRecords) record(key string, now time.Time) *memRecord {
	rec := r.m[key]
	if rec != nil && !now.Before(rec.expires) {
		delete(r.m, key)
		return nil
	}
	return rec
}

// put stores a record, then drops what must go: expired records first,
// then, while the shard is over limit, the oldest. The shard's lock must be
// held.
func (r *memRecords) put(key string, data []byte, expires, now time.Time, limit int) {
	r.seq++
	r.m[key] = &memRecord{data: data, expires: expires, seq: r.seq}
	q := queued{key, r.seq, expires}
	r.queue = append(r.queue, q)
	r.pushExpiry(q)
	for len(r.byExpiry) > 0 && !now.Before(r.byExpiry[0].expires) {
		r.drop(r.popExpiry())
	}
	for r.head < len(r.queue) {
		q := r.queue[r.head]
		if r.live(q) && len(r.m) <= limit {
			break
		}
		r.drop(q)
		r.queue[r.head] = queued{}
		r.head++
	}
	r.compact()
}

// live reports whether q names the record that key holds now.
func (r *memRecords) live(q queued) bool {
	rec := r.m[q.key]
	return rec != nil && rec.seq == q.seq
}

func (r *memRecords) drop(q queued) {
	if r.live(q) {
		delete(r.m, q.key)
	}
}

// compact keeps the queue and the heap within a small multiple of the
// records they order, dropping their stale entries.
func (r *memRecords) compact() {
	if r.head > 64 && r.head > len(r.queue)/2 {
		n := copy(r.queue, r.queue[r.head:])
		clear(r.queue[n:])
		r.queue = r.queue[:n]
		r.head = 0
	}
	if len(r.queue)-r.head > 2*len(r.m)+64 {
		r.queue = slices.DeleteFunc(r.queue[r.head:], func(q queued) bool { return !r.live(q) })
		r.head = 0
	}
	if len(r.byExpiry) > 2*len(r.m)+64 {
		live := slices.DeleteFunc(r.byExpiry, func(q queued) bool { return !r.live(q) })
		r.byExpiry = live[:0:len(live)]
		for _, q := range live {
			r.pushExpiry(q)
		}
	}
}

func (r *memRecords) pushExpiry(q queued) {
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

func (r *memRecords) popExpiry() queued {
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

func (r *memRecord) entry() Entry {
	return Entry{State: Completed, Record: bytes.Clone(r.data), Expires: r.expires}
}

// Reserve implements Store.
func (s *MemoryStore) Reserve(ctx context.Context, key string, c Claim) (Entry, error) {
	if s.closed.Load() {
		return Entry{}, ErrClosed
	}
	if err := checkClaim(key, c); err != nil {
		return Entry{}, err
	}
	return s.table.state(s, key, &c)
}

func (s *MemoryStore) record(sh *leaseShard[memRecords], key string, now time.Time) (Entry, bool, error) {
	if rec := sh.extra.record(key, now); rec != nil {
		return rec.entry(), true, nil
	}
	return Entry{}, false, nil
}

func (s *MemoryStore) acquirable() error { return nil }

// Renew implements Store.
func (s *MemoryStore) Renew(ctx context.Context, key string, c Claim) error {
	if s.closed.Load() {
		return ErrClosed
	}
	if err := checkClaim(key, c); err != nil {
		return err
	}
	return s.table.renew(s, key, c)
}

// Complete implements Store.
func (s *MemoryStore) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	if s.closed.Load() {
		return ErrClosed
	}
	if err := checkRecord(key, retention); err != nil {
		return err
	}
	sh := s.table.shard(key)
	now := time.Now()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	l := sh.live(key, now)
	switch {
	case l == nil && sh.extra.record(key, now) != nil:
		return ErrNotOwner // completed by another owner
	case l != nil && l.token != token:
		return ErrNotOwner
	}
	sh.extra.put(key, bytes.Clone(record), now.Add(retention), now, s.perShard)
	if l != nil {
		sh.end(key, l)
	}
	return nil
}

// Release implements Store.
func (s *MemoryStore) Release(ctx context.Context, key, token string) error {
	if s.closed.Load() {
		return ErrClosed
	}
	return s.table.release(key, token)
}

// Lookup implements Store.
func (s *MemoryStore) Lookup(ctx context.Context, key string) (Entry, error) {
	if s.closed.Load() {
		return Entry{}, ErrClosed
	}
	return s.table.state(s, key, nil)
}

// Wait implements Store.
func (s *MemoryStore) Wait(ctx context.Context, key string, seen Entry) error {
	if s.closed.Load() {
		return ErrClosed
	}
	return s.table.wait(ctx, key, seen)
}

// Len returns how many completed records the store holds, expired ones
// included until they are dropped.
func (s *MemoryStore) Len() int {
	n := 0
	for i := range s.table.shards {
		sh := &s.table.shards[i]
		sh.mu.Lock()
		n += len(sh.extra.m)
		sh.mu.Unlock()
	}
	return n
}

// Close implements Store. It drops every record.
func (s *MemoryStore) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	for i := range s.table.shards {
		sh := &s.table.shards[i]
		sh.mu.Lock()
		for k, l := range sh.leases {
			sh.end(k, l)
		}
		sh.extra.m = make(map[string]*memRecord)
		sh.extra.queue, sh.extra.head, sh.extra.byExpiry = nil, 0, nil
		sh.mu.Unlock()
	}
	return nil
}
