// Package pgstore is an idempotency.Store in PostgreSQL (pgx v5): for services
// that run several replicas sharing one database, and for handlers that want
// their own writes committed in the same transaction as the stored record.
//
// Reserve is one statement. Waiters on every replica are woken through
// LISTEN/NOTIFY, one listening connection per Store. A background sweeper
// deletes expired rows in batches; until it does, they act as absent. Every
// time is taken from the database's clock, so that replicas whose clocks
// disagree still agree on who holds a key.
//
// In transactional mode (see Store.BeginTx), the handler's writes and the
// record commit or roll back together: a call has its effect exactly once,
// even across crashes. It covers every RPC kind: a unary handler calls
// BeginTx with its ctx, a streaming handler (server, client or
// bidirectional) with stream.Context(). A unary answer is sent after the
// commit; a stream's messages are sent before it, as the handler sends them.
// BeginTx says which calls it does not cover.
//
// Leases run out by the database's clock: a replica paused for longer than
// its lease cannot be told from a dead one. When it resumes, its renewal
// takes the key back if nobody else took it; if somebody did, its handler's
// context is cancelled with idempotency.ErrLeaseLost, and its record (and,
// in transactional mode, its writes) cannot overwrite the new owner's.
// Durations outside (0, idempotency.MaxRetention] and store keys longer than
// idempotency.MaxStoreKeyLength are refused.
package pgstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/grpcidem/idempotency"
)

// Defaults, as documented on each option.
const (
	DefaultSweepInterval   = time.Minute
	DefaultSweepBatch      = 1000
	DefaultRecheckInterval = 2 * time.Second
)

// An Option configures a Store.
type Option func(*options)

type options struct {
	table         string
	channel       string
	sweepInterval time.Duration
	sweepBatch    int
	recheck       time.Duration
	txOptions     pgx.TxOptions
	logger        *slog.Logger
}

// WithTable sets the table, "name" or "schema.name" (DefaultTable by
// default). Each part is letters, digits and underscores, and is quoted, so
// its case is kept. Stores that share a table share their keys: that is how
// replicas work together.
func WithTable(name string) Option {
	return func(o *options) { o.table = name }
}

// WithChannel sets the LISTEN/NOTIFY channel that wakes waiters. By default
// it is the table's name, so that stores on one table, and only those, hear
// each other. Every Store on a table must use the same channel.
func WithChannel(name string) Option {
	return func(o *options) { o.channel = name }
}

// WithSweepInterval sets how often the sweeper deletes expired rows
// (DefaultSweepInterval by default). Zero or less turns the sweeper off, for
// teams that delete expired rows with their own job: expired rows still act
// as absent, and a Reserve of their key reuses them.
func WithSweepInterval(d time.Duration) Option {
	return func(o *options) { o.sweepInterval = d }
}

// WithSweepBatch sets how many rows one sweeper statement deletes at most
// (DefaultSweepBatch by default; zero or less keeps it). The sweeper repeats
// the statement until a batch comes back short, so small batches keep locks
// short without leaving rows behind.
func WithSweepBatch(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.sweepBatch = n
		}
	}
}

// WithRecheckInterval sets how often a waiting Wait looks at its key even
// without a notification (DefaultRecheckInterval by default; zero or less
// keeps it). Notifications wake waiters at once; this bounds the delay when
// one is lost, such as while the listening connection reconnects.
func WithRecheckInterval(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.recheck = d
		}
	}
}

// WithTxOptions sets the options of the transactions BeginTx starts, such as
// the isolation level (the database's default by default). Under Serializable,
// a serialization failure at commit makes Complete report
// idempotency.ErrRolledBack, and the caller retries.
func WithTxOptions(opts pgx.TxOptions) Option {
	return func(o *options) { o.txOptions = opts }
}

// WithLogger sets where the store logs what happens in the background: the
// listening connection's reconnects and the sweeper's errors
// (slog.Default() by default).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.logger = l
		}
	}
}

// Store is an idempotency.Store in a PostgreSQL table. Its methods are safe
// for concurrent use; several Stores, in one process or many, may share one
// table.
type Store struct {
	pool     *pgxpool.Pool
	table    tableName
	channel  string
	opts     options
	sql      statements
	closed   atomic.Bool
	stop     context.CancelFunc
	wg       sync.WaitGroup
	listener *listener
	notifier *notifier
	beginMu  sync.Mutex // makes BeginTx's check-and-attach atomic
}

var _ idempotency.Store = (*Store)(nil)

// New returns a Store on pool's database. It connects the listening
// connection at once (with ctx), so that a bad connection fails here; it
// does not create the table: call Migrate, or apply Schema's SQL.
//
// The Store takes one connection out of pool for listening, for as long as
// it is open, and transactional mode holds one per running handler: size the
// pool for both. Close stops the store's background work; it does not close
// pool, which remains the caller's.
func New(ctx context.Context, pool *pgxpool.Pool, opts ...Option) (*Store, error) {
	if pool == nil {
		return nil, errors.New("pgstore: New needs a pool")
	}
	o := options{
		table:         DefaultTable,
		sweepInterval: DefaultSweepInterval,
		sweepBatch:    DefaultSweepBatch,
		recheck:       DefaultRecheckInterval,
		logger:        slog.Default(),
	}
	for _, opt := range opts {
		opt(&o)
	}
	table, err := parseTable(o.table)
	if err != nil {
		return nil, err
	}
	if o.channel == "" {
		o.channel = table.plain()
	}
	if err := checkChannel(o.channel); err != nil {
		return nil, err
	}
	s := &Store{pool: pool, table: table, channel: o.channel, opts: o, sql: buildStatements(table)}
	s.listener = newListener(s)
	s.notifier = newNotifier(s)
	bg, stop := context.WithCancel(context.Background())
	s.stop = stop
	conn, err := s.listener.connect(ctx)
	if err != nil {
		stop()
		return nil, fmt.Errorf("pgstore: listen on channel %q: %w", o.channel, err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.listener.run(bg, conn)
	}()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.notifier.run(bg)
	}()
	if o.sweepInterval > 0 {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.sweepLoop(bg)
		}()
	}
	return s, nil
}

func checkChannel(name string) error {
	if len(name) > maxIdentifier {
		return fmt.Errorf("pgstore: channel %q longer than %d bytes; set a shorter one with WithChannel", name, maxIdentifier)
	}
	for i := 0; i < len(name); i++ {
		if name[i] == 0 {
			return fmt.Errorf("pgstore: channel %q holds a NUL byte", name)
		}
	}
	return nil
}

// statements are the store's SQL, with its table name in place. $1 is always
// the key.
type statements struct {
	reserve, renew, complete, release, watch, lookup, sweep, notify string
}

func buildStatements(t tableName) statements {
	return statements{
		// A live row seen by the statement's snapshot is answered without
		// writing or locking, so replays and waiters' re-reserves are pure
		// reads. Otherwise the INSERT takes the key, or takes over a row
		// that expired. Under READ COMMITTED, ON CONFLICT sees rows the
		// snapshot does not: a row committed by a concurrent transaction
		// after the statement began makes both branches empty, and Reserve
		// runs the statement again with a fresh snapshot.
		reserve: fmt.Sprintf(`WITH live AS (
    SELECT completed, token, fingerprint, record, expires_at FROM %[1]s
    WHERE key = $1::bytea AND expires_at > now()
), acquired AS (
    INSERT INTO %[1]s AS r (key, completed, token, fingerprint, record, created_at, expires_at)
    SELECT $1::bytea, false, $2::text, $3::bytea, NULL, now(), now() + $4::bigint * interval '1 microsecond'
    WHERE NOT EXISTS (SELECT FROM live)
    ON CONFLICT (key) DO UPDATE
        SET completed = false, token = excluded.token, fingerprint = excluded.fingerprint,
            record = NULL, created_at = excluded.created_at, expires_at = excluded.expires_at,
            waiters = false
        WHERE r.expires_at <= now()
    RETURNING r.expires_at
)
SELECT true, false, $2::text, NULL::bytea, NULL::bytea, expires_at, now() FROM acquired
UNION ALL
SELECT false, completed, token, fingerprint, record, expires_at, now() FROM live`, t),

		// The owner extends its lease; a lease that ran out is still its
		// owner's until someone takes it over, as in every store. A key
		// that is absent (no row, or an expired one, whoever's it was) is
		// taken back under the claim, fingerprint included, as Reserve
		// would: the owner still runs, and its work is still the only work
		// on the key. Another owner's live lease, or a live record, matches
		// neither branch, and nothing changes. One statement, so the check
		// and the write are atomic, as in Reserve and Complete.
		renew: fmt.Sprintf(`INSERT INTO %[1]s AS r (key, completed, token, fingerprint, record, created_at, expires_at)
VALUES ($1::bytea, false, $2::text, $3::bytea, NULL, now(), now() + $4::bigint * interval '1 microsecond')
ON CONFLICT (key) DO UPDATE
    SET completed = false, token = excluded.token,
        fingerprint = CASE WHEN r.token = excluded.token AND NOT r.completed
            THEN coalesce(excluded.fingerprint, r.fingerprint) ELSE excluded.fingerprint END,
        record = NULL,
        created_at = CASE WHEN r.token = excluded.token AND NOT r.completed
            THEN r.created_at ELSE excluded.created_at END,
        expires_at = excluded.expires_at
    WHERE (r.token = excluded.token AND NOT r.completed) OR r.expires_at <= now()`, t),

		// Stores the record if the key is pending under the token, or
		// absent (no row, or an expired one): the fencing rule. A row
		// already completed under the same token is this owner's own
		// record, from an attempt whose reply was lost (the connection
		// died after the commit): the retry succeeds and writes the same
		// record again, instead of reporting another owner. It returns
		// whether a duplicate waits (waiters, kept from the row it
		// replaces): only then is the change notified.
		complete: fmt.Sprintf(`INSERT INTO %[1]s AS r (key, completed, token, fingerprint, record, created_at, expires_at)
VALUES ($1::bytea, true, $2::text, NULL, coalesce($3::bytea, ''::bytea), now(), now() + $4::bigint * interval '1 microsecond')
ON CONFLICT (key) DO UPDATE
    SET completed = true, token = excluded.token,
        fingerprint = CASE WHEN r.token = excluded.token THEN r.fingerprint END,
        record = excluded.record, created_at = excluded.created_at, expires_at = excluded.expires_at
    WHERE r.token = excluded.token OR r.expires_at <= now()
RETURNING waiters`, t),

		// A lease that ran out holds nothing (the key is absent, as in
		// every store), so its row is left to the sweeper and the Release
		// is refused.
		release: fmt.Sprintf(`DELETE FROM %[1]s WHERE key = $1 AND token = $2 AND NOT completed AND expires_at > now() RETURNING waiters`, t),

		// A waiter marks the lease it waits for, so that its end is
		// notified, and learns in the same step whether that lease still
		// holds the key (no row: it changed). Complete and Release lock
		// the row too, so either they see the mark or the waiter sees
		// their change: no notification is missed, and none is sent for
		// a key nobody waits for.
		watch: fmt.Sprintf(`UPDATE %[1]s SET waiters = true
WHERE key = $1 AND token = $2 AND NOT completed AND expires_at > now()
RETURNING expires_at, now()`, t),

		// One transaction for a batch of keys, whose commit does not wait
		// for the disk (see notifier).
		notify: `SELECT count(*) FROM
    (SELECT set_config('synchronous_commit', 'off', true)) AS async,
    (SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload) AS sent`,

		lookup: fmt.Sprintf(`SELECT completed, token, fingerprint, record, expires_at, now() FROM %[1]s
WHERE key = $1 AND expires_at > now()`, t),

		// SKIP LOCKED lets the sweepers of several replicas, and the rows
		// a Reserve or a transactional Complete is writing, pass each
		// other. The outer condition is checked again on the locked row.
		sweep: fmt.Sprintf(`DELETE FROM %[1]s WHERE key IN (
    SELECT key FROM %[1]s WHERE expires_at <= now()
    LIMIT $1 FOR UPDATE SKIP LOCKED
) AND expires_at <= now()`, t),
	}
}

// micros converts a duration to the whole microseconds PostgreSQL keeps,
// rounding up so that a positive duration stays positive. It cannot overflow
// (adding before dividing did, for durations near math.MaxInt64, and turned
// them negative: rows written already expired). The store refuses durations
// outside (0, idempotency.MaxRetention] anyway (checkClaim, checkRecord), which
// PostgreSQL's interval and timestamp arithmetic hold exactly.
func micros(d time.Duration) int64 {
	us := int64(d / time.Microsecond)
	if d%time.Microsecond > 0 {
		us++
	}
	return us
}

// checkClaim refuses what Reserve and Renew must not write: a key longer than
// idempotency.MaxStoreKeyLength (the error wraps idempotency.ErrKeyTooLong),
// a claim without a token, and a lease outside (0, idempotency.MaxRetention].
func checkClaim(op, key string, c idempotency.Claim) error {
	if err := idempotency.CheckStoreKey(key); err != nil {
		return fmt.Errorf("pgstore: %s: %w", op, err)
	}
	if c.Token == "" {
		return fmt.Errorf("pgstore: %s needs a claim with a token", op)
	}
	if err := idempotency.CheckDuration("Claim.Lease", c.Lease); err != nil {
		return fmt.Errorf("pgstore: %s: %w", op, err)
	}
	return nil
}

// checkRecord refuses what Complete must not write: a key longer than
// idempotency.MaxStoreKeyLength (wrapping idempotency.ErrKeyTooLong), and a
// retention outside (0, idempotency.MaxRetention].
func checkRecord(key string, retention time.Duration) error {
	if err := idempotency.CheckStoreKey(key); err != nil {
		return err
	}
	return idempotency.CheckDuration("retention", retention)
}

// localTime moves a database time onto the local clock: the times in an
// Entry are compared with time.Now() by the caller, and replicas' clocks may
// disagree with the database's. sent is when the statement was sent, so the
// result errs early, by at most one round trip.
func localTime(db, dbNow, sent time.Time) time.Time {
	return sent.Add(db.Sub(dbNow))
}

// maxReserveAttempts bounds Reserve's re-runs. Each one needs another
// transaction to have changed the key while the statement ran.
const maxReserveAttempts = 10

// Reserve implements idempotency.Store, in one statement (two, rarely, when a
// concurrent transaction changed the key while the first one ran).
func (s *Store) Reserve(ctx context.Context, key string, c idempotency.Claim) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	if err := checkClaim("reserve", key, c); err != nil {
		return idempotency.Entry{}, err
	}
	for range maxReserveAttempts {
		var (
			acquired, completed bool
			token               string
			fingerprint, record []byte
			expires, dbNow      time.Time
		)
		sent := time.Now()
		err := s.pool.QueryRow(ctx, s.sql.reserve, []byte(key), c.Token, c.Fingerprint, micros(c.Lease)).
			Scan(&acquired, &completed, &token, &fingerprint, &record, &expires, &dbNow)
		if errors.Is(err, pgx.ErrNoRows) {
			continue
		}
		if err != nil {
			return idempotency.Entry{}, fmt.Errorf("pgstore: reserve: %w", err)
		}
		exp := localTime(expires, dbNow, sent)
		switch {
		case acquired:
			return idempotency.Entry{State: idempotency.Acquired, Token: c.Token, LeaseExpires: exp}, nil
		case completed:
			return idempotency.Entry{State: idempotency.Completed, Record: nonNil(record), Expires: exp}, nil
		default:
			return idempotency.Entry{State: idempotency.Pending, Token: token, Fingerprint: fingerprint, LeaseExpires: exp}, nil
		}
	}
	return idempotency.Entry{}, fmt.Errorf("pgstore: reserve: key changed under %d attempts in a row; try again", maxReserveAttempts)
}

func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// Renew implements idempotency.Store, in one statement: it extends the lease
// if key is pending under claim.Token (even if the lease ran out meanwhile),
// or takes key back under claim if it is absent (no row, or an expired row,
// whoever's it was: the sweeper may not have deleted it yet). Another owner's
// live lease, or a live record, gives idempotency.ErrNotOwner. Claim.Held is
// ignored: replicas sharing the table cannot tell a paused owner from a dead
// one, so a lease runs out by the database's clock.
func (s *Store) Renew(ctx context.Context, key string, claim idempotency.Claim) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	if err := checkClaim("renew", key, claim); err != nil {
		return err
	}
	tag, err := s.pool.Exec(ctx, s.sql.renew, []byte(key), claim.Token, claim.Fingerprint, micros(claim.Lease))
	if err != nil {
		return fmt.Errorf("pgstore: renew: %w", err)
	}
	if tag.RowsAffected() == 0 {
		return idempotency.ErrNotOwner
	}
	return nil
}

// Complete implements idempotency.Store. If the handler began a transaction
// with BeginTx, the record is written in it, and the transaction commits; if
// anything fails, it is rolled back and the error wraps
// idempotency.ErrRolledBack (and nothing else): the call had no effect.
func (s *Store) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	if st := s.takeTx(ctx); st != nil {
		return s.completeTx(ctx, st, key, token, record, retention)
	}
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	if err := checkRecord(key, retention); err != nil {
		return fmt.Errorf("pgstore: complete: %w", err)
	}
	var waiters bool
	err := s.pool.QueryRow(ctx, s.sql.complete, []byte(key), token, record, micros(retention)).Scan(&waiters)
	if errors.Is(err, pgx.ErrNoRows) {
		return idempotency.ErrNotOwner
	}
	if err != nil {
		return fmt.Errorf("pgstore: complete: %w", err)
	}
	if waiters {
		s.notifier.add(key)
	}
	return nil
}

// Release implements idempotency.Store. If the handler began a transaction
// with BeginTx, it is rolled back first: the call failed, and its writes must
// not persist.
func (s *Store) Release(ctx context.Context, key, token string) error {
	if st := s.takeTx(ctx); st != nil {
		if err := st.tx.Rollback(ctx); err != nil && !errors.Is(err, pgx.ErrTxClosed) {
			// The connection is gone or broken, and its transaction with
			// it: the writes cannot commit anymore. Releasing the key is
			// still right.
			s.opts.logger.Warn("pgstore: rolling back the handler's transaction failed", "err", err)
		}
	}
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	var waiters bool
	err := s.pool.QueryRow(ctx, s.sql.release, []byte(key), token).Scan(&waiters)
	if errors.Is(err, pgx.ErrNoRows) {
		return idempotency.ErrNotOwner
	}
	if err != nil {
		return fmt.Errorf("pgstore: release: %w", err)
	}
	if waiters {
		s.notifier.add(key)
	}
	return nil
}

// Lookup implements idempotency.Store.
func (s *Store) Lookup(ctx context.Context, key string) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	var (
		completed           bool
		token               string
		fingerprint, record []byte
		expires, dbNow      time.Time
	)
	sent := time.Now()
	err := s.pool.QueryRow(ctx, s.sql.lookup, []byte(key)).
		Scan(&completed, &token, &fingerprint, &record, &expires, &dbNow)
	if errors.Is(err, pgx.ErrNoRows) {
		return idempotency.Entry{State: idempotency.Absent}, nil
	}
	if err != nil {
		return idempotency.Entry{}, fmt.Errorf("pgstore: lookup: %w", err)
	}
	exp := localTime(expires, dbNow, sent)
	if completed {
		return idempotency.Entry{State: idempotency.Completed, Record: nonNil(record), Expires: exp}, nil
	}
	return idempotency.Entry{State: idempotency.Pending, Token: token, Fingerprint: fingerprint, LeaseExpires: exp}, nil
}

// Wait implements idempotency.Store. It is woken by the NOTIFY that Complete
// and Release send; it also looks at the key when the lease seen should run
// out (by the database's clock, so a renewed lease keeps it waiting), and
// every recheck interval in case a notification was lost.
func (s *Store) Wait(ctx context.Context, key string, seen idempotency.Entry) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	// Listen before looking, so that a change committed after the look is
	// heard.
	w := s.listener.register(notifyPayload(key))
	defer s.listener.unregister(w)
	timer := time.NewTimer(0)
	defer timer.Stop()
	<-timer.C
	for {
		var expires, dbNow time.Time
		sent := time.Now()
		err := s.pool.QueryRow(ctx, s.sql.watch, []byte(key), seen.Token).Scan(&expires, &dbNow)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil // no longer pending under seen.Token
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("pgstore: wait: %w", err)
		}
		// The floor keeps a lease that is about to run out on the
		// database's clock, but already has on the local one (times err
		// early by a round trip), from spinning.
		left := max(time.Until(localTime(expires, dbNow, sent)), 10*time.Millisecond)
		timer.Reset(min(left, s.opts.recheck))
		select {
		case <-w.ch:
			return nil
		case <-timer.C:
		case <-ctx.Done():
			return ctx.Err()
		case <-s.listener.closed:
			return idempotency.ErrClosed
		}
	}
}

// Close stops the sweeper and the listening connection, sends the
// notifications still due, and wakes every waiter with idempotency.ErrClosed.
// It does not close the pool, which belongs to the caller: close the Store
// first. A second Close returns nil.
// Health implements idempotency.HealthChecker: it pings PostgreSQL through
// the pool, and returns idempotency.ErrClosed once the store is closed.
func (s *Store) Health(ctx context.Context) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	return s.pool.Ping(ctx)
}

var _ idempotency.HealthChecker = (*Store)(nil)

func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.stop()
	s.wg.Wait()
	return nil
}
