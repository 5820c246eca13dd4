package boltstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/internal/inproc"
)

// Store is the default Store: records on disk in a bbolt file, for one
// server process. A first execution costs one durable commit, when its record
// is complete; concurrent completions share one commit (group commit) without
// waiting for company, so a lone call commits at once. Leases of running
// calls are held in memory: a bbolt file serves one process, and when that
// process dies its leases die with it. A background sweeper deletes expired
// records.
//
// For several server replicas, use a store they share (redisstore, pgstore).
type Store struct {
	db      *bolt.DB
	ownsDB  bool
	file    *boltFile
	records []byte // bucket names
	expiry  []byte
	// table holds the leases, and per shard a cache of recent records so
	// that a replay, which usually follows its first execution closely,
	// is answered without a read transaction. Every write goes through
	// this store, so the cache never disagrees with the file.
	table      inproc.Table[inproc.Records]
	cacheLimit int // records per shard; 0: no cache

	// The group commit: a write joins queue; if no commit is under way,
	// its caller commits at once (leads), else the commit under way hands
	// the lead to the first write that joined meanwhile, whose caller then
	// commits every write waiting. committing is set while a caller leads.
	commitMu   sync.Mutex
	queue      []*boltWrite
	spare      []*boltWrite
	committing bool
	closing    bool       // Close began: no write joins any more
	idle       *sync.Cond // on commitMu: committing ended
	stop       chan struct{}
	wg         sync.WaitGroup
	closed     atomic.Bool
	once       sync.Once

	sweepEvery time.Duration
	sweepBatch int
	logger     *slog.Logger

	commits, written, commitNanos atomic.Uint64

	// failed is set while the file cannot take writes: the last commit
	// failed, and no commit or probe has succeeded since. New first
	// executions are refused meanwhile.
	failed  atomic.Pointer[writeFailure]
	probing atomic.Bool

	onCommit func(records int, took time.Duration) // WithCommitObserver
}

// writeFailure is why the file cannot take writes, and since when.
type writeFailure struct {
	err   error
	since time.Time
}

// Stats counts the store's group commits since it was opened.
type Stats struct {
	// Commits is how many transactions wrote records; Records is how many
	// records they wrote. Records/Commits is how many first executions
	// shared each commit.
	Commits, Records uint64
	// CommitTime is the time spent in those transactions, fsyncs included.
	CommitTime time.Duration
}

// Stats reports the store's group commits, for metrics.
func (s *Store) Stats() Stats {
	return Stats{Commits: s.commits.Load(), Records: s.written.Load(), CommitTime: time.Duration(s.commitNanos.Load())}
}

// A Option configures a Store.
type Option func(*config)

type config struct {
	cacheRecords int
	lockTimeout  time.Duration
	sweepEvery   time.Duration
	sweepBatch   int
	bucket       string
	boltOptions  *bolt.Options
	logger       *slog.Logger
	onCommit     func(records int, took time.Duration)
}

// Defaults of the bbolt store.
const (
	DefaultLockTimeout   = 2 * time.Second
	DefaultSweepInterval = time.Minute
	DefaultSweepBatch    = 1000
	DefaultBucket        = "idempotency"
	DefaultCacheRecords  = 4096
	maxCachedRecord      = 16 << 10
)

// WithLockTimeout bounds how long Open waits for the file lock that
// another process holds before it fails. Zero or less keeps the default,
// 2 seconds.
func WithLockTimeout(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.lockTimeout = d
		}
	}
}

// WithCacheRecords bounds how many recent records (of at most 16 KiB each)
// the store keeps in memory to answer replays without a read transaction.
// Zero turns the cache off; less than zero keeps the default, 4096.
func WithCacheRecords(n int) Option {
	return func(c *config) {
		if n >= 0 {
			c.cacheRecords = n
		}
	}
}

// WithSweepInterval sets how often expired records are deleted. Zero or less
// keeps the default, one minute. Expired records act as absent before they
// are swept.
func WithSweepInterval(d time.Duration) Option {
	return func(c *config) {
		if d > 0 {
			c.sweepEvery = d
		}
	}
}

// WithSweepBatch bounds how many records one sweep transaction deletes, so
// that a sweep never holds the writer for long. Zero or less keeps the
// default, 1000.
func WithSweepBatch(n int) Option {
	return func(c *config) {
		if n > 0 {
			c.sweepBatch = n
		}
	}
}

// WithBucket sets the name of the bucket that holds the records (another,
// named with the suffix ".expiry", indexes them by expiry). Use it to share
// a bbolt file with the application. The default is "idempotency".
func WithBucket(name string) Option {
	return func(c *config) {
		if name != "" {
			c.bucket = name
		}
	}
}

// WithBoltOptions sets the options Open passes to bbolt.Open; their
// Timeout is replaced by WithLockTimeout's.
func WithBoltOptions(o *bolt.Options) Option {
	return func(c *config) { c.boltOptions = o }
}

// WithLogger sets the logger for the sweeper's failures; the default is
// slog.Default().
func WithLogger(l *slog.Logger) Option {
	return func(c *config) {
		if l != nil {
			c.logger = l
		}
	}
}

// WithCommitObserver sets a function called after each group commit with
// how many records it wrote and how long it took, fsync included (a commit
// that failed counts too). It is called on the store's commit loop, before
// the writers of the commit are woken: keep it fast. idemotel.BoltCommits
// turns it into histograms; Stats gives the totals without it.
func WithCommitObserver(observe func(records int, took time.Duration)) Option {
	return func(c *config) { c.onCommit = observe }
}

func newConfig(opts []Option) config {
	c := config{
		cacheRecords: DefaultCacheRecords,
		lockTimeout:  DefaultLockTimeout,
		sweepEvery:   DefaultSweepInterval,
		sweepBatch:   DefaultSweepBatch,
		bucket:       DefaultBucket,
		logger:       slog.Default(),
	}
	for _, o := range opts {
		o(&c)
	}
	return c
}

// ErrUnwritable is returned (wrapped) by a Store's Reserve of a key that
// would start a first execution while the store's file cannot take writes
// (the disk is full, the file system went read-only, an I/O error): the
// handler would run, but its outcome could not be saved, so the call is
// refused before it runs (the interceptors answer Unavailable). Replays of
// stored records still work. The store probes the file in the background and
// takes first executions again once a write succeeds.
var ErrUnwritable = errors.New("idempotency: the bbolt file cannot take writes")

// ErrLocked is returned (wrapped) by Open when another process holds the
// file.
var ErrLocked = errors.New("idempotency: bbolt file is in use by another process")

// Open opens or creates the bbolt file at path (mode 0600) and returns a
// store on it. Close closes the file. If another process holds the file,
// Open fails after WithLockTimeout with an error that wraps ErrLocked;
// if a store of this process holds it, Open fails at once with an error
// that wraps ErrAlreadyOpen. A damaged file is an error that wraps
// ErrCorrupt, never a panic; an empty file is a new store.
func Open(path string, opts ...Option) (*Store, error) {
	c := newConfig(opts)
	bo := bolt.Options{}
	if c.boltOptions != nil {
		bo = *c.boltOptions
	}
	bo.Timeout = c.lockTimeout
	db, file, err := openBoltFile(path, bo)
	if errors.Is(err, berrors.ErrTimeout) {
		return nil, fmt.Errorf("%w: %s stayed locked for %v; a bbolt store serves one process at a time "+
			"(stop the other process, or use redisstore or pgstore to share records between replicas)",
			ErrLocked, path, c.lockTimeout)
	}
	if errors.Is(err, ErrCorrupt) || errors.Is(err, ErrAlreadyOpen) {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("idempotency: open bbolt file %s: %w", path, err)
	}
	s, err := newStore(db, c, file)
	if err != nil {
		file.closeDB(db)
		return nil, err
	}
	s.ownsDB = true
	return s, nil
}

// New returns a store on an open bbolt database, in its own buckets.
// Close stops the store's work but leaves db open.
func New(db *bolt.DB, opts ...Option) (*Store, error) {
	return newStore(db, newConfig(opts), &boltFile{path: db.Path()})
}

func newStore(db *bolt.DB, c config, file *boltFile) (*Store, error) {
	if db.IsReadOnly() {
		return nil, errors.New("idempotency: the bbolt database is read-only")
	}
	s := &Store{
		db:         db,
		file:       file,
		records:    []byte(c.bucket),
		expiry:     []byte(c.bucket + ".expiry"),
		stop:       make(chan struct{}),
		sweepEvery: c.sweepEvery,
		sweepBatch: c.sweepBatch,
		logger:     c.logger,
		onCommit:   c.onCommit,
	}
	s.table.Init()
	if c.cacheRecords > 0 {
		s.cacheLimit = max(1, c.cacheRecords/inproc.NumShards)
		for i := range s.table.Shards {
			s.table.Shards[i].Extra.Reset()
		}
	}
	err := s.update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(s.records); err != nil {
			return err
		}
		_, err := tx.CreateBucketIfNotExists(s.expiry)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("idempotency: create buckets in %s: %w", db.Path(), err)
	}
	s.idle = sync.NewCond(&s.commitMu)
	s.wg.Add(1)
	go s.sweepLoop()
	return s, nil
}

var _ idempotency.Store = (*Store)(nil)

// DB returns the underlying database.
func (s *Store) DB() *bolt.DB { return s.db }

// A record's value is its expiry (Unix nanoseconds, big-endian) followed by
// the record. Its expiry index key is the same expiry followed by the key, so
// that the sweeper finds expired records in order without a scan.
const expiryLen = 8

func (s *Store) read(key string, now time.Time) (idempotency.Entry, bool, error) {
	var e idempotency.Entry
	found := false
	err := s.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(s.records).Get([]byte(key))
		if len(v) < expiryLen {
			return nil
		}
		exp := time.Unix(0, int64(binary.BigEndian.Uint64(v)))
		if !now.Before(exp) {
			return nil
		}
		found = true
		e = idempotency.Entry{State: idempotency.Completed, Record: bytes.Clone(v[expiryLen:]), Expires: exp}
		return nil
	})
	return e, found, err
}

// Record returns the live record of key, from the cache or the file; the
// shard's lock must be held.
func (src source) Record(sh *inproc.Shard[inproc.Records], key string, now time.Time) (idempotency.Entry, bool, error) {
	s := src.s
	if s.cacheLimit > 0 {
		if rec := sh.Extra.Get(key, now); rec != nil {
			return rec.Entry(), true, nil
		}
	}
	e, found, err := s.read(key, now)
	if err != nil {
		return idempotency.Entry{}, false, fmt.Errorf("idempotency: bbolt read: %w", err)
	}
	if found {
		s.cache(sh, key, bytes.Clone(e.Record), e.Expires, now)
	}
	return e, found, nil
}

// cache keeps a small record in memory; the shard's lock must be held, and
// data must not be shared.
func (s *Store) cache(sh *inproc.Shard[inproc.Records], key string, data []byte, expires, now time.Time) {
	if s.cacheLimit > 0 && len(data) <= maxCachedRecord {
		sh.Extra.Put(key, data, expires, now, s.cacheLimit)
	}
}

func (src source) Acquirable() error {
	s := src.s
	if f := s.failed.Load(); f != nil {
		return fmt.Errorf("%w: %s: its last commit failed %v ago (%v); first executions resume once a write succeeds",
			ErrUnwritable, s.db.Path(), time.Since(f.since).Round(time.Millisecond), f.err)
	}
	return nil
}

// Health implements idempotency.HealthChecker: it returns an error that
// wraps ErrUnwritable while the file cannot take writes (from the commit
// that failed until a commit or the background probe succeeds), and
// idempotency.ErrClosed once the store is closed. It does no I/O.
func (s *Store) Health(context.Context) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	return source{s}.Acquirable()
}

var _ idempotency.HealthChecker = (*Store)(nil)

// source finds the store's records for its lease table.
type source struct{ s *Store }

// errEmptyKey refuses the empty store key, which bbolt cannot hold (the
// interceptors never make it: a store key holds a "/"). It is refused
// before anything is held, so that no Reserve acquires a key whose
// Complete must fail.
var errEmptyKey = errors.New("idempotency: bbolt cannot hold the empty store key")

// Reserve implements idempotency.Store.
func (s *Store) Reserve(ctx context.Context, key string, c idempotency.Claim) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	if err := inproc.CheckClaim(key, c); err != nil {
		return idempotency.Entry{}, err
	}
	if key == "" {
		return idempotency.Entry{}, errEmptyKey
	}
	return s.table.State(source{s}, key, &c)
}

// Renew implements idempotency.Store.
func (s *Store) Renew(ctx context.Context, key string, c idempotency.Claim) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	if err := inproc.CheckClaim(key, c); err != nil {
		return err
	}
	if key == "" {
		return errEmptyKey
	}
	return s.table.Renew(source{s}, key, c)
}

// Release implements idempotency.Store. It writes nothing to disk.
func (s *Store) Release(ctx context.Context, key, token string) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	return s.table.Release(key, token)
}

// Complete implements idempotency.Store. It returns once the record is durable.
func (s *Store) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	if err := inproc.CheckRecord(key, retention); err != nil {
		return err
	}
	if key == "" {
		return errEmptyKey
	}
	sh := s.table.Shard(key)
	now := time.Now()
	sh.Mu.Lock()
	l := sh.Live(key, now)
	if l != nil && (l.Token != token || l.Completing) {
		sh.Mu.Unlock()
		return idempotency.ErrNotOwner
	}
	// An absent key may hold another owner's record: the write checks.
	checkAbsent := l == nil
	if l == nil {
		// Not taken over while completing, whatever its expiry says.
		l = &inproc.Lease{Token: token, Expires: now.Add(idempotency.DefaultLease), Length: idempotency.DefaultLease}
		sh.Leases[key] = l
	}
	l.Completing = true
	sh.Mu.Unlock()

	w := &boltWrite{
		key:         []byte(key),
		value:       make([]byte, expiryLen+len(record)),
		checkAbsent: checkAbsent,
		now:         now,
		done:        make(chan error, 1),
	}
	binary.BigEndian.PutUint64(w.value, uint64(now.Add(retention).UnixNano()))
	copy(w.value[expiryLen:], record)
	err := s.submit(w)

	sh.Mu.Lock()
	switch {
	case err == nil:
		s.cache(sh, key, w.value[expiryLen:], now.Add(retention), time.Now())
		sh.End(key, l)
	case errors.Is(err, idempotency.ErrNotOwner), errors.Is(err, idempotency.ErrClosed):
		sh.End(key, l)
	default:
		// The outcome is real but not saved: the key stays held for one
		// more lease, so that duplicates wait (and the owner may try
		// again) instead of running the handler again at once.
		l.Unhold(time.Now())
	}
	sh.Mu.Unlock()
	return err
}

// Lookup implements idempotency.Store.
func (s *Store) Lookup(ctx context.Context, key string) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	return s.table.State(source{s}, key, nil)
}

// Wait implements idempotency.Store.
func (s *Store) Wait(ctx context.Context, key string, seen idempotency.Entry) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	return s.table.Wait(ctx, key, seen)
}

// Close implements Store: it stops the sweeper, lets the writes under way
// commit, ends every lease, and closes the file if Open opened it.
func (s *Store) Close() error {
	var err error
	s.once.Do(func() {
		s.closed.Store(true)
		// The writes that joined before commit, then nothing joins.
		s.commitMu.Lock()
		s.closing = true
		for s.committing {
			s.idle.Wait()
		}
		s.commitMu.Unlock()
		close(s.stop)
		s.wg.Wait()
		for i := range s.table.Shards {
			sh := &s.table.Shards[i]
			sh.Mu.Lock()
			for k, l := range sh.Leases {
				sh.End(k, l)
			}
			clear(sh.Extra.M)
			sh.Extra.Reset()
			sh.Mu.Unlock()
		}
		if s.ownsDB {
			err = s.file.closeDB(s.db)
		}
	})
	return err
}

// boltWrite is one record write waiting for a commit.
type boltWrite struct {
	key, value  []byte
	checkAbsent bool
	now         time.Time
	done        chan error
}

// submit commits w with the writes waiting with it, and returns its
// result. A lone write commits at once, on its caller's goroutine: no
// hand-off to another goroutine and back, which costs two wake-ups of an
// idle thread. Writes that arrive during a commit wait for it, and the first
// of them then commits them all: a group commit without a batching delay.
func (s *Store) submit(w *boltWrite) error {
	s.commitMu.Lock()
	if s.closing {
		s.commitMu.Unlock()
		return idempotency.ErrClosed
	}
	s.queue = append(s.queue, w)
	lead := !s.committing
	s.committing = true
	s.commitMu.Unlock()
	if !lead {
		if err := <-w.done; err != errLead {
			return err
		}
	}
	s.lead()
	return <-w.done
}

// errLead tells a waiting write's caller that it commits the next batch.
var errLead = errors.New("boltstore: commit the writes waiting")

// lead commits every write waiting (the leader's own among them), then hands
// the lead to the first write that arrived meanwhile, or ends it.
func (s *Store) lead() {
	s.commitMu.Lock()
	batch := s.queue
	s.queue = s.spare[:0]
	s.commitMu.Unlock()
	s.commit(batch)
	s.commitMu.Lock()
	s.spare = batch[:0]
	if len(s.queue) > 0 {
		s.queue[0].done <- errLead // its result is not sent yet: room for it
	} else {
		s.committing = false
		s.idle.Broadcast()
	}
	s.commitMu.Unlock()
}

func (s *Store) commit(batch []*boltWrite) {
	start := time.Now()
	results := make([]error, len(batch))
	err := s.update(func(tx *bolt.Tx) error {
		records, expiry := tx.Bucket(s.records), tx.Bucket(s.expiry)
		for i, w := range batch {
			results[i] = s.put(records, expiry, w)
		}
		return nil
	})
	s.commits.Add(1)
	s.written.Add(uint64(len(batch)))
	s.commitNanos.Add(uint64(time.Since(start)))
	if s.onCommit != nil {
		s.onCommit(len(batch), time.Since(start))
	}
	s.wrote(err)
	for i, w := range batch {
		if err != nil {
			w.done <- fmt.Errorf("idempotency: bbolt commit: %w", err)
		} else {
			w.done <- results[i]
		}
		clear(batch[i : i+1])
	}
}

// wrote records the outcome of a commit: a failure stops new first
// executions until a write succeeds again, which a probe checks in the
// background; a success resumes them. It runs in the leading caller, one
// commit at a time.
func (s *Store) wrote(err error) {
	if err == nil {
		s.resume()
		return
	}
	if s.failed.CompareAndSwap(nil, &writeFailure{err: err, since: time.Now()}) {
		s.logger.Error("idempotency: a bbolt commit failed; new first executions are refused (Unavailable) until a write succeeds", "path", s.db.Path(), "err", err)
	}
	if s.probing.CompareAndSwap(false, true) {
		// Close waits for the commit under way before it waits for
		// the group, and the sweeper keeps it above zero until then,
		// so Add cannot race Close's Wait.
		s.wg.Add(1)
		go s.probeLoop()
	}
}

// resume takes first executions again after a write succeeded.
func (s *Store) resume() {
	if f := s.failed.Swap(nil); f != nil {
		s.logger.Info("idempotency: the bbolt file takes writes again; first executions resume", "path", s.db.Path(), "down_for", time.Since(f.since).Round(time.Millisecond))
	}
}

// Probes of a file that cannot take writes start this often and back off
// to the maximum.
const (
	boltProbeMin = 50 * time.Millisecond
	boltProbeMax = 2 * time.Second
)

// probeLoop writes a probe to the file until a write succeeds (or a commit
// of records does), then clears the failure.
func (s *Store) probeLoop() {
	defer s.wg.Done()
	defer s.probing.Store(false)
	every := boltProbeMin
	t := time.NewTimer(every)
	defer t.Stop()
	for s.failed.Load() != nil {
		select {
		case <-t.C:
		case <-s.stop:
			return
		}
		if err := s.probe(); err == nil {
			s.resume()
			return
		}
		every = min(2*every, boltProbeMax)
		t.Reset(every)
	}
}

// probeSize is what a probe writes: enough to need pages the file may not
// have yet, as a batch of records would.
const probeSize = 64 << 10

// probe checks that the file takes writes as a commit of records would: it
// writes a value into a bucket of its own, durably, then removes the bucket.
func (s *Store) probe() error {
	name := append(bytes.Clone(s.records), ".probe"...)
	err := s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(name)
		if err != nil {
			return err
		}
		return b.Put([]byte("probe"), make([]byte, probeSize))
	})
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error { return tx.DeleteBucket(name) })
}

func (s *Store) put(records, expiry *bolt.Bucket, w *boltWrite) error {
	if old := records.Get(w.key); len(old) >= expiryLen {
		oldExp := int64(binary.BigEndian.Uint64(old))
		if w.checkAbsent && w.now.UnixNano() < oldExp {
			return idempotency.ErrNotOwner
		}
		if err := expiry.Delete(expiryKey(old[:expiryLen], w.key)); err != nil {
			return err
		}
	}
	if err := records.Put(w.key, w.value); err != nil {
		return err
	}
	return expiry.Put(expiryKey(w.value[:expiryLen], w.key), nil)
}

func expiryKey(exp, key []byte) []byte {
	k := make([]byte, 0, len(exp)+len(key))
	return append(append(k, exp...), key...)
}

// Records calls fn with every live record, in store-key order, from one
// consistent snapshot, until fn returns false. The Entry is fn's to keep.
// It is for operators' tools; the interceptors never scan.
func (s *Store) Records(fn func(key string, e idempotency.Entry) bool) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	now := time.Now()
	return s.view(func(tx *bolt.Tx) error {
		c := tx.Bucket(s.records).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if len(v) < expiryLen {
				continue
			}
			exp := time.Unix(0, int64(binary.BigEndian.Uint64(v)))
			if !now.Before(exp) {
				continue
			}
			if !fn(string(k), idempotency.Entry{State: idempotency.Completed, Record: bytes.Clone(v[expiryLen:]), Expires: exp}) {
				return nil
			}
		}
		return nil
	})
}

// ErrInProgress is returned (wrapped) by Forget and ForgetKey for a key
// whose first execution is still running. It is idempotency.ErrInProgress.
var ErrInProgress = idempotency.ErrInProgress

// Forget deletes the record of key, so that the next call with its key runs
// the handler again, and reports whether there was one. It is for operators
// who must undo a stored outcome (the handler's effect was reversed by hand,
// say); it refuses a key whose first execution is running (ErrInProgress).
// It is ForgetKey without force.
func (s *Store) Forget(key string) (bool, error) {
	e, err := s.ForgetKey(context.Background(), key, false)
	return e.State == idempotency.Completed, err
}

var _ idempotency.Inspector = (*Store)(nil)

// ForgetKey implements idempotency.Inspector. Deleting a record is one
// commit; an expired record not yet swept is deleted too, and reported as
// absent.
func (s *Store) ForgetKey(ctx context.Context, key string, force bool) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	return s.table.Forget(key, force, func(sh *inproc.Shard[inproc.Records]) (idempotency.Entry, error) {
		delete(sh.Extra.M, key)
		e := idempotency.Entry{State: idempotency.Absent}
		now := time.Now()
		err := s.update(func(tx *bolt.Tx) error {
			records, expiry := tx.Bucket(s.records), tx.Bucket(s.expiry)
			v := records.Get([]byte(key))
			if len(v) < expiryLen {
				return nil
			}
			if exp := time.Unix(0, int64(binary.BigEndian.Uint64(v))); now.Before(exp) {
				e = idempotency.Entry{State: idempotency.Completed, Record: bytes.Clone(v[expiryLen:]), Expires: exp}
			}
			if err := expiry.Delete(expiryKey(v[:expiryLen], []byte(key))); err != nil {
				return err
			}
			return records.Delete([]byte(key))
		})
		if err != nil {
			return idempotency.Entry{}, fmt.Errorf("idempotency: bbolt forget: %w", err)
		}
		return e, nil
	})
}

// ListKeys implements idempotency.Inspector: pending and completed keys, in
// store-key order, the records read from one snapshot of the file.
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
	// Leases first, then the file: a key that completes in between has
	// its record in the file before its lease ends, so it is seen either
	// way.
	keys := s.table.ListPending(prefix, after, limit, now)
	err = s.view(func(tx *bolt.Tx) error {
		c := tx.Bucket(s.records).Cursor()
		seek := []byte(prefix)
		if after > prefix {
			seek = []byte(after)
		}
		n := 0
		for k, v := c.Seek(seek); k != nil && n < limit && bytes.HasPrefix(k, []byte(prefix)); k, v = c.Next() {
			if string(k) <= after || len(v) < expiryLen {
				continue
			}
			exp := time.Unix(0, int64(binary.BigEndian.Uint64(v)))
			if !now.Before(exp) {
				continue
			}
			keys = append(keys, idempotency.ListedKey{Key: string(k),
				Entry: idempotency.Entry{State: idempotency.Completed, Record: bytes.Clone(v[expiryLen:]), Expires: exp}})
			n++
		}
		return nil
	})
	if err != nil {
		return nil, "", fmt.Errorf("idempotency: bbolt list: %w", err)
	}
	keys = inproc.SortListed(keys, limit)
	return keys, inproc.PageToken(keys, limit), nil
}

// Summary implements idempotency.Inspector. Records counts the records in
// the file, expired ones not yet swept included (so it is Approximate);
// Bytes is the size of the file. Extra holds the group-commit figures of
// Stats: commits, records_committed and commit_time_ns.
func (s *Store) Summary(ctx context.Context) (idempotency.StoreSummary, error) {
	if s.closed.Load() {
		return idempotency.StoreSummary{}, idempotency.ErrClosed
	}
	sum := idempotency.StoreSummary{Store: "bbolt", Pending: s.table.CountPending(), Approximate: true}
	err := s.view(func(tx *bolt.Tx) error {
		sum.Records = int64(tx.Bucket(s.records).Stats().KeyN)
		sum.Bytes = tx.Size()
		return nil
	})
	if err != nil {
		return idempotency.StoreSummary{}, fmt.Errorf("idempotency: bbolt stats: %w", err)
	}
	st := s.Stats()
	sum.Extra = map[string]int64{
		"commits":           int64(st.Commits),
		"records_committed": int64(st.Records),
		"commit_time_ns":    int64(st.CommitTime),
	}
	return sum, nil
}

func (s *Store) sweepLoop() {
	defer s.wg.Done()
	t := time.NewTicker(s.sweepEvery)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			if _, err := s.Sweep(); err != nil {
				s.logger.Error("idempotency: bbolt sweep failed", "path", s.db.Path(), "err", err)
			}
		case <-s.stop:
			return
		}
	}
}

// Sweep deletes the records that have expired, in transactions of at most
// WithSweepBatch records each, and returns how many it deleted. The store
// calls it every WithSweepInterval; call it yourself to reclaim space now.
func (s *Store) Sweep() (int, error) {
	deleted := 0
	for {
		select {
		case <-s.stop:
			return deleted, nil
		default:
		}
		var now [expiryLen]byte
		binary.BigEndian.PutUint64(now[:], uint64(time.Now().UnixNano()))
		// Collect under a read transaction, so that the writer is held only
		// for the deletes.
		var due [][]byte
		err := s.view(func(tx *bolt.Tx) error {
			c := tx.Bucket(s.expiry).Cursor()
			for k, _ := c.First(); k != nil && len(due) < s.sweepBatch; k, _ = c.Next() {
				if bytes.Compare(k[:expiryLen], now[:]) >= 0 {
					break
				}
				due = append(due, bytes.Clone(k))
			}
			return nil
		})
		if err != nil || len(due) == 0 {
			return deleted, err
		}
		err = s.update(func(tx *bolt.Tx) error {
			records, expiry := tx.Bucket(s.records), tx.Bucket(s.expiry)
			for _, k := range due {
				key := k[expiryLen:]
				// The record may have been written again since.
				if v := records.Get(key); len(v) >= expiryLen && bytes.Equal(v[:expiryLen], k[:expiryLen]) {
					if err := records.Delete(key); err != nil {
						return err
					}
					deleted++
				}
				if err := expiry.Delete(k); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil || len(due) < s.sweepBatch {
			return deleted, err
		}
	}
}
