package idempotency

import (
	"bytes"
	"context"
	"sync/atomic"
	"time"
)

// MemoryStore is a Store in process memory: the same semantics as the other
// stores, without durability. Use it in tests, and where losing every record
// on restart is acceptable. Its size is bounded: past the bound, the oldest
// records are dropped first.
type MemoryStore struct {
	table    leaseTable[memRecords]
	perShard int // records per shard before the oldest is dropped
	closed   atomic.Bool
}

type memRecords struct {
	m     map[string]*memRecord
	queue []queued // insertion order, for dropping the oldest
	head  int
	seq   uint64
}

type memRecord struct {
	data    []byte
	expires time.Time
	seq     uint64
}

type queued struct {
	key string
	seq uint64
}

// A MemoryOption configures a MemoryStore.
type MemoryOption func(*MemoryStore)

// DefaultMemoryMaxRecords is the default bound of a MemoryStore.
const DefaultMemoryMaxRecords = 1 << 20

// WithMaxRecords bounds how many completed records a MemoryStore keeps; past
// it, the oldest records are dropped, and their keys act as never used. The
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

func (r *memRecords) put(key string, data []byte, expires, now time.Time, limit int) {
	r.seq++
	r.m[key] = &memRecord{data: data, expires: expires, seq: r.seq}
	r.queue = append(r.queue, queued{key, r.seq})
	// Drop from the front what is stale (replaced, expired) or over the limit.
	for r.head < len(r.queue) {
		q := r.queue[r.head]
		rec := r.m[q.key]
		switch {
		case rec == nil || rec.seq != q.seq:
		case !now.Before(rec.expires) || len(r.m) > limit:
			delete(r.m, q.key)
		default:
			r.compact()
			return
		}
		r.queue[r.head] = queued{}
		r.head++
	}
	r.compact()
}

func (r *memRecords) compact() {
	if r.head > 64 && r.head > len(r.queue)/2 {
		n := copy(r.queue, r.queue[r.head:])
		clear(r.queue[n:])
		r.queue = r.queue[:n]
		r.head = 0
	}
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
		sh.extra.queue, sh.extra.head = nil, 0
		sh.mu.Unlock()
	}
	return nil
}
