// Package memstore is an idempotency.Store in process memory: the same
// semantics as the other stores, without durability. Use it in tests, and
// where losing every record on restart is acceptable.
package memstore

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/internal/inproc"
)

// Store is a Store in process memory: the same semantics as the other
// stores, without durability. Use it in tests, and where losing every record
// on restart is acceptable. Its size is bounded: past the bound, expired
// records go first, then the oldest.
type Store struct {
	table    inproc.Table[inproc.Records]
	perShard int // records per shard before the oldest is dropped
	closed   atomic.Bool
}

// A Option configures a Store.
type Option func(*Store)

// DefaultMaxRecords is the default bound of a Store.
const DefaultMaxRecords = 1 << 20

// WithMaxRecords bounds how many completed records a Store keeps; past
// it, expired records are dropped first, then the oldest live ones, whose
// keys then act as never used. The
// bound is applied per shard of the store, so it is approximate. Zero or less
// keeps the default, DefaultMaxRecords.
func WithMaxRecords(n int) Option {
	return func(s *Store) {
		if n > 0 {
			s.perShard = max(1, n/inproc.NumShards)
		}
	}
}

// New returns an empty Store.
func New(opts ...Option) *Store {
	s := &Store{perShard: DefaultMaxRecords / inproc.NumShards}
	for _, o := range opts {
		o(s)
	}
	s.table.Init()
	for i := range s.table.Shards {
		s.table.Shards[i].Extra.Reset()
	}
	return s
}

var _ idempotency.Store = (*Store)(nil)

// Reserve implements idempotency.Store.
func (s *Store) Reserve(ctx context.Context, key string, c idempotency.Claim) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	if err := inproc.CheckClaim(key, c); err != nil {
		return idempotency.Entry{}, err
	}
	return s.table.State(records{}, key, &c)
}

func (records) Record(sh *inproc.Shard[inproc.Records], key string, now time.Time) (idempotency.Entry, bool, error) {
	if rec := sh.Extra.Get(key, now); rec != nil {
		return rec.Entry(), true, nil
	}
	return idempotency.Entry{}, false, nil
}

func (records) Acquirable() error { return nil }

// records finds the store's records for its lease table.
type records struct{}

// Renew implements idempotency.Store.
func (s *Store) Renew(ctx context.Context, key string, c idempotency.Claim) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	if err := inproc.CheckClaim(key, c); err != nil {
		return err
	}
	return s.table.Renew(records{}, key, c)
}

// Complete implements idempotency.Store.
func (s *Store) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	if err := inproc.CheckRecord(key, retention); err != nil {
		return err
	}
	sh := s.table.Shard(key)
	now := time.Now()
	sh.Mu.Lock()
	defer sh.Mu.Unlock()
	l := sh.Live(key, now)
	switch {
	case l == nil && sh.Extra.Get(key, now) != nil:
		return idempotency.ErrNotOwner // completed by another owner
	case l != nil && l.Token != token:
		return idempotency.ErrNotOwner
	}
	sh.Extra.Put(key, record, now.Add(retention), now, s.perShard)
	if l != nil {
		sh.End(key, l)
	}
	return nil
}

// Release implements idempotency.Store.
func (s *Store) Release(ctx context.Context, key, token string) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	return s.table.Release(key, token)
}

// Lookup implements idempotency.Store.
func (s *Store) Lookup(ctx context.Context, key string) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	return s.table.State(records{}, key, nil)
}

// Wait implements idempotency.Store.
func (s *Store) Wait(ctx context.Context, key string, seen idempotency.Entry) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	return s.table.Wait(ctx, key, seen)
}

// Len returns how many completed records the store holds, expired ones
// included until they are dropped.
func (s *Store) Len() int {
	n := 0
	for i := range s.table.Shards {
		sh := &s.table.Shards[i]
		sh.Mu.Lock()
		n += len(sh.Extra.M)
		sh.Mu.Unlock()
	}
	return n
}

// Close implements idempotency.Store. It drops every record.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	for i := range s.table.Shards {
		sh := &s.table.Shards[i]
		sh.Mu.Lock()
		for k, l := range sh.Leases {
			sh.End(k, l)
		}
		sh.Extra.Reset()
		sh.Mu.Unlock()
	}
	return nil
}

var _ idempotency.Inspector = (*Store)(nil)

// ListKeys implements idempotency.Inspector: pending and completed keys, in
// store-key order. Each page looks at every key of the store, which is
// bounded by WithMaxRecords.
func (s *Store) ListKeys(ctx context.Context, prefix, pageToken string, limit int) ([]idempotency.ListedKey, string, error) {
	if s.closed.Load() {
		return nil, "", idempotency.ErrClosed
	}
	if err := inproc.CheckList(limit); err != nil {
		return nil, "", err
	}
	after, err := inproc.ParsePageToken(pageToken)
	if err != nil {
		return nil, "", err
	}
	now := time.Now()
	var keys []idempotency.ListedKey
	for i := range s.table.Shards {
		sh := &s.table.Shards[i]
		sh.Mu.Lock()
		// Under one lock, so that a key completing meanwhile is seen
		// either way: pending, or completed.
		keys = sh.ListPending(keys, prefix, after, now)
		keys = sh.Extra.ListRecords(keys, prefix, after, now)
		sh.Mu.Unlock()
	}
	keys = inproc.SortListed(keys, limit)
	return keys, inproc.PageToken(keys, limit), nil
}

// ForgetKey implements idempotency.Inspector.
func (s *Store) ForgetKey(ctx context.Context, key string, force bool) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	return s.table.Forget(key, force, func(sh *inproc.Shard[inproc.Records]) (idempotency.Entry, error) {
		rec := sh.Extra.Get(key, time.Now())
		if rec == nil {
			return idempotency.Entry{State: idempotency.Absent}, nil
		}
		delete(sh.Extra.M, key)
		return rec.Entry(), nil
	})
}

// Summary implements idempotency.Inspector: exact counts of live records and
// pending keys, and Bytes, the records' bytes.
func (s *Store) Summary(ctx context.Context) (idempotency.StoreSummary, error) {
	if s.closed.Load() {
		return idempotency.StoreSummary{}, idempotency.ErrClosed
	}
	sum := idempotency.StoreSummary{Store: "memory", Pending: s.table.CountPending()}
	now := time.Now()
	for i := range s.table.Shards {
		sh := &s.table.Shards[i]
		sh.Mu.Lock()
		for _, rec := range sh.Extra.M {
			if now.Before(rec.Expires) {
				sum.Records++
				sum.Bytes += int64(len(rec.Data))
			}
		}
		sh.Mu.Unlock()
	}
	return sum, nil
}
