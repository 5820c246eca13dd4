package pgstore_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/pgstore"
)

func TestSchemaNames(t *testing.T) {
	for _, bad := range []string{"", "a.b.c", "1abc", "a-b", `a"b`, "a b", "tbl;drop", ".x", "x.", strings.Repeat("x", 64), strings.Repeat("x", 52)} {
		if _, err := pgstore.Schema(bad); err == nil {
			t.Errorf("Schema(%q): nil error, want one naming the bad table", bad)
		}
	}
	for _, good := range []string{"idempotency_records", "app.records", "Mixed_Case9", strings.Repeat("x", 48)} {
		sql, err := pgstore.Schema(good)
		if err != nil {
			t.Errorf("Schema(%q): %v", good, err)
			continue
		}
		if !strings.Contains(sql, "CREATE TABLE IF NOT EXISTS") || !strings.Contains(sql, "CREATE INDEX IF NOT EXISTS") {
			t.Errorf("Schema(%q) lacks the idempotent CREATE statements:\n%s", good, sql)
		}
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	pool := newPool(t, nil)
	for name, opts := range map[string][]pgstore.Option{
		"bad table":    {pgstore.WithTable("no such; table")},
		"long channel": {pgstore.WithChannel(strings.Repeat("c", 64))},
		"nul channel":  {pgstore.WithChannel("a\x00b")},
	} {
		if s, err := pgstore.New(t.Context(), pool, opts...); err == nil {
			s.Close()
			t.Errorf("%s: New succeeded, want an error", name)
		}
	}
	if _, err := pgstore.New(t.Context(), nil); err == nil {
		t.Error("New(nil pool) succeeded, want an error")
	}
}

func TestNewFailsFastWhenUnreachable(t *testing.T) {
	newPool(t, nil) // skip when the database is down: this test needs a refusing port, not a missing server
	cfg, err := pgxpool.ParseConfig("postgres://postgres@127.0.0.1:1/test?sslmode=disable&connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	pool, err := pgxpool.NewWithConfig(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if s, err := pgstore.New(ctx, pool); err == nil {
		s.Close()
		t.Fatal("New on an unreachable database succeeded, want an error")
	}
}

// TestMigrate: concurrent and repeated migrations succeed, a mixed-case,
// schema-qualified table works, and the columns are what Schema documents.
func TestMigrate(t *testing.T) {
	pool := newPool(t, nil)
	ctx := t.Context()
	schema := "pgstore_test_s_" + randomHex(4)
	if _, err := pool.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Exec(context.Background(), "DROP SCHEMA "+schema+" CASCADE") })
	table := schema + ".Mixed_Case"

	var stores []*pgstore.Store
	for range 4 {
		s, err := pgstore.New(ctx, pool, pgstore.WithTable(table), pgstore.WithSweepInterval(0))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		stores = append(stores, s)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for _, s := range stores {
		wg.Go(func() { errs <- s.Migrate(ctx) })
		wg.Go(func() { errs <- s.Migrate(ctx) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent Migrate: %v", err)
		}
	}

	var cols []string
	rows, _ := pool.Query(ctx, `SELECT column_name || ' ' || data_type FROM information_schema.columns
		WHERE table_schema = $1 AND table_name = 'Mixed_Case' ORDER BY ordinal_position`, schema)
	cols, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"key bytea", "completed boolean", "token text", "fingerprint bytea", "record bytea",
		"created_at timestamp with time zone", "expires_at timestamp with time zone", "waiters boolean"}
	if fmt.Sprint(cols) != fmt.Sprint(want) {
		t.Fatalf("columns of %s: %v, want %v", table, cols, want)
	}

	k, tok := key("migrate"), token()
	if e, err := stores[0].Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Minute}); err != nil || e.State != idempotency.Acquired {
		t.Fatalf("Reserve on %s: %+v, %v", table, e, err)
	}
	if e, err := stores[3].Lookup(ctx, k); err != nil || e.State != idempotency.Pending || e.Token != tok {
		t.Fatalf("Lookup on %s from another store: %+v, %v", table, e, err)
	}
}

func TestInputValidation(t *testing.T) {
	_, _, s := setup(t)
	ctx := t.Context()
	k := key("validate")
	if _, err := s.Reserve(ctx, k, idempotency.Claim{Lease: time.Minute}); err == nil {
		t.Error("Reserve without a token: nil error")
	}
	if _, err := s.Reserve(ctx, k, idempotency.Claim{Token: token()}); err == nil {
		t.Error("Reserve without a lease: nil error")
	}
	tok := token()
	if _, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Minute}); err != nil {
		t.Fatal(err)
	}
	if err := s.Renew(ctx, k, idempotency.Claim{Token: tok, Lease: 0}); err == nil || errors.Is(err, idempotency.ErrNotOwner) {
		t.Errorf("Renew with a zero lease: %v, want a validation error", err)
	}
	if err := s.Complete(ctx, k, tok, []byte("r"), -time.Second); err == nil || errors.Is(err, idempotency.ErrNotOwner) {
		t.Errorf("Complete with a negative retention: %v, want a validation error", err)
	}
	if e, _ := s.Lookup(ctx, k); e.State != idempotency.Pending {
		t.Errorf("after refused calls: %v, want still pending", e.State)
	}
}

// TestTimesFromDatabaseClock writes rows as a replica would, with times of
// the database's clock, and checks that expiry follows that clock and that
// the Entry's times are moved onto the local one.
func TestTimesFromDatabaseClock(t *testing.T) {
	pool, table, s := setup(t)
	ctx := t.Context()
	tbl := pgx.Identifier{table}.Sanitize()
	expired, live := key("expired"), key("live")
	_, err := pool.Exec(ctx, `INSERT INTO `+tbl+` (key, completed, token, record, expires_at) VALUES
		($1, true, 'old', 'rec', now() - interval '1 second'),
		($2, true, 'new', 'rec', now() + interval '1 hour')`, []byte(expired), []byte(live))
	if err != nil {
		t.Fatal(err)
	}
	if e, err := s.Lookup(ctx, expired); err != nil || e.State != idempotency.Absent {
		t.Fatalf("Lookup of a row expired by the database clock: %v, %v; want absent", e.State, err)
	}
	e, err := s.Lookup(ctx, live)
	if err != nil || e.State != idempotency.Completed {
		t.Fatalf("Lookup of a live row: %v, %v", e.State, err)
	}
	if d := time.Until(e.Expires); d < time.Hour-10*time.Second || d > time.Hour+time.Second {
		t.Fatalf("Expires is %v from now, want about an hour", d)
	}
	tok := token()
	if e, err := s.Reserve(ctx, expired, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil || e.State != idempotency.Acquired {
		t.Fatalf("Reserve over an expired row: %+v, %v", e, err)
	}
}

// TestBinaryKeys: keys differing only in bytes that text would mangle are
// distinct keys, up to the longest store key.
func TestBinaryKeys(t *testing.T) {
	_, _, s := setup(t)
	ctx := t.Context()
	base := key("bin")
	keys := []string{base, base + "\x00", base + "\x00\x00", base + "\xff", base + "\xc3\x28", base + strings.Repeat("k", idempotency.MaxStoreKeyLength-len(base))}
	for i, k := range keys {
		tok := token()
		if e, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil || e.State != idempotency.Acquired {
			t.Fatalf("Reserve key %d: %+v, %v", i, e, err)
		}
		if err := s.Complete(ctx, k, tok, []byte{byte(i)}, time.Hour); err != nil {
			t.Fatalf("Complete key %d: %v", i, err)
		}
	}
	for i, k := range keys {
		e, err := s.Lookup(ctx, k)
		if err != nil || e.State != idempotency.Completed || len(e.Record) != 1 || e.Record[0] != byte(i) {
			t.Fatalf("Lookup key %d: %+v, %v", i, e, err)
		}
	}
}

// TestReserveIsOneStatement counts the queries each kind of Reserve sends.
func TestReserveIsOneStatement(t *testing.T) {
	counter := &queryCounter{tagged: true}
	pool := newPool(t, func(c *pgxpool.Config) { c.ConnConfig.Tracer = counter })
	table := newTable(t, pool)
	s := newStore(t, pool, table)
	ctx := t.Context()
	k, owner := key("one-statement"), token()

	statements := func(what string, want idempotency.State, claim idempotency.Claim) {
		t.Helper()
		before := counter.n.Load()
		e, err := s.Reserve(counted(ctx), k, claim)
		if err != nil || e.State != want {
			t.Fatalf("%s: %+v, %v; want %v", what, e, err, want)
		}
		if n := counter.n.Load() - before; n != 1 {
			t.Fatalf("%s sent %d statements, want 1", what, n)
		}
	}
	statements("Reserve of an absent key", idempotency.Acquired, idempotency.Claim{Token: owner, Lease: 200 * time.Millisecond})
	statements("Reserve of a pending key", idempotency.Pending, idempotency.Claim{Token: token(), Lease: time.Hour})
	// Take an expired lease over: wait for it on the database's clock.
	for {
		e, err := s.Lookup(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		if e.State == idempotency.Absent {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	owner = token()
	statements("Reserve of an expired key", idempotency.Acquired, idempotency.Claim{Token: owner, Lease: time.Hour})
	if err := s.Complete(ctx, k, owner, []byte("record"), time.Hour); err != nil {
		t.Fatal(err)
	}
	statements("Reserve of a completed key", idempotency.Completed, idempotency.Claim{Token: token(), Lease: time.Hour})
}

// holdKey begins a transaction that writes key's row without committing,
// and returns a function committing it. Statements on the key block until
// then.
func holdKey(t *testing.T, pool *pgxpool.Pool, table, k, sql string, args ...any) func() {
	t.Helper()
	tx, err := pool.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(t.Context(), fmt.Sprintf(sql, pgx.Identifier{table}.Sanitize()), append([]any{[]byte(k)}, args...)...); err != nil {
		tx.Rollback(t.Context())
		t.Fatal(err)
	}
	return func() {
		if err := tx.Commit(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
}

// waitBlocked waits until some backend waits on a lock: the Reserve under
// test, behind holdKey's transaction.
func waitBlocked(t *testing.T, pool *pgxpool.Pool, table string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var n int
		err := pool.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND datname = current_database() AND query LIKE '%'||$1||'%'`, table).Scan(&n)
		if err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the Reserve never blocked on the held row")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestReserveSeesConcurrentCommit forces the READ COMMITTED race: a row
// committed by another transaction after Reserve's statement began is not in
// its snapshot, yet ON CONFLICT sees it. Reserve must report it, not fail or
// claim the key twice.
func TestReserveSeesConcurrentCommit(t *testing.T) {
	counter := &queryCounter{match: "WITH live AS"} // Reserve's statement
	pool := newPool(t, func(c *pgxpool.Config) { c.ConnConfig.Tracer = counter })
	table := newTable(t, pool)
	s := newStore(t, pool, table)
	ctx := t.Context()

	cases := []struct {
		name  string
		setup func(k string) // what the snapshot sees
		hold  string         // the concurrent, not yet committed, change
		want  idempotency.State
	}{
		{
			name: "insert of an absent key",
			hold: `INSERT INTO %s (key, token, fingerprint, expires_at) VALUES ($1, 'other', '\x01', now() + interval '1 hour')`,
			want: idempotency.Pending,
		},
		{
			name: "takeover of an expired lease",
			setup: func(k string) {
				pool.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (key, token, expires_at) VALUES ($1, 'dead', now() - interval '1 second')`,
					pgx.Identifier{table}.Sanitize()), []byte(k))
			},
			hold: `UPDATE %s SET token = 'other', fingerprint = '\x01', expires_at = now() + interval '1 hour' WHERE key = $1`,
			want: idempotency.Pending,
		},
		{
			name: "completion of an expired lease by its late owner",
			setup: func(k string) {
				pool.Exec(ctx, fmt.Sprintf(`INSERT INTO %s (key, token, expires_at) VALUES ($1, 'other', now() - interval '1 second')`,
					pgx.Identifier{table}.Sanitize()), []byte(k))
			},
			hold: `UPDATE %s SET completed = true, record = '\x01', expires_at = now() + interval '1 hour' WHERE key = $1`,
			want: idempotency.Completed,
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			k := key("race")
			if c.setup != nil {
				c.setup(k)
			}
			commit := holdKey(t, pool, table, k, c.hold)
			before := counter.n.Load()
			type result struct {
				e   idempotency.Entry
				err error
			}
			done := make(chan result, 1)
			go func() {
				e, err := s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour})
				done <- result{e, err}
			}()
			waitBlocked(t, pool, table)
			commit()
			r := <-done
			if r.err != nil {
				t.Fatalf("Reserve: %v", r.err)
			}
			if r.e.State != c.want {
				t.Fatalf("Reserve: %+v, want %v", r.e, c.want)
			}
			if c.want == idempotency.Pending && (r.e.Token != "other" || string(r.e.Fingerprint) != "\x01") {
				t.Fatalf("Reserve: %+v, want the concurrent owner's token and fingerprint", r.e)
			}
			if c.want == idempotency.Completed && string(r.e.Record) != "\x01" {
				t.Fatalf("Reserve: %+v, want the concurrent record", r.e)
			}
			// The statement that missed the row, and its one re-run.
			if n := counter.n.Load() - before; n != 2 {
				t.Fatalf("Reserve sent %d statements, want 2: the first misses the row, the second sees it", n)
			}
		})
	}
}

// TestConcurrentReserveOneWinner: 64 goroutines over 4 stores (4 listeners,
// one table) reserve one key at once; exactly one acquires it, and everyone
// else sees the winner. Repeated, for absent keys and for expired leases.
func TestConcurrentReserveOneWinner(t *testing.T) {
	pool := newPool(t, func(c *pgxpool.Config) { c.MaxConns = 32 })
	table := newTable(t, pool)
	var stores []*pgstore.Store
	for range 4 {
		stores = append(stores, newStore(t, pool, table))
	}
	ctx := t.Context()
	const racers = 64
	race := func(k string) {
		t.Helper()
		var (
			wg      sync.WaitGroup
			start   = make(chan struct{})
			entries = make([]idempotency.Entry, racers)
			tokens  = make([]string, racers)
			errs    = make([]error, racers)
		)
		for i := range racers {
			tokens[i] = token()
			wg.Go(func() {
				<-start
				entries[i], errs[i] = stores[i%len(stores)].Reserve(ctx, k, idempotency.Claim{Token: tokens[i], Lease: time.Hour})
			})
		}
		close(start)
		wg.Wait()
		winner := -1
		for i, e := range entries {
			if errs[i] != nil {
				t.Fatalf("racer %d: %v", i, errs[i])
			}
			if e.State == idempotency.Acquired {
				if winner >= 0 {
					t.Fatalf("racers %d and %d both acquired %q", winner, i, k)
				}
				winner = i
			}
		}
		if winner < 0 {
			t.Fatalf("no racer acquired %q", k)
		}
		for i, e := range entries {
			if i != winner && (e.State != idempotency.Pending || e.Token != tokens[winner]) {
				t.Fatalf("racer %d: %+v, want pending under the winner's token", i, e)
			}
		}
	}
	for round := range 20 {
		race(key(fmt.Sprint("absent-", round)))
	}
	tbl := pgx.Identifier{table}.Sanitize()
	for round := range 10 {
		k := key(fmt.Sprint("expired-", round))
		if _, err := pool.Exec(ctx, `INSERT INTO `+tbl+` (key, token, expires_at) VALUES ($1, 'dead', now() - interval '1 second')`, []byte(k)); err != nil {
			t.Fatal(err)
		}
		race(k)
	}
}

func TestRenewExtendsOnDatabaseClock(t *testing.T) {
	_, _, s := setup(t)
	ctx := t.Context()
	k, tok := key("renew"), token()
	if _, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Second}); err != nil {
		t.Fatal(err)
	}
	if err := s.Renew(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil {
		t.Fatal(err)
	}
	e, err := s.Lookup(ctx, k)
	if err != nil || e.State != idempotency.Pending {
		t.Fatal(e, err)
	}
	if d := time.Until(e.LeaseExpires); d < time.Hour-10*time.Second {
		t.Fatalf("after Renew(1h) the lease ends in %v", d)
	}
	if err := s.Renew(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour}); !errors.Is(err, idempotency.ErrNotOwner) {
		t.Fatalf("Renew by another token: %v, want ErrNotOwner", err)
	}
}

// TestWaitWokenByNotify: with the fallback re-check and the lease an hour
// away, only a notification can end the Wait, from a store with its own
// listener.
func TestWaitWokenByNotify(t *testing.T) {
	pool := newPool(t, nil)
	table := newTable(t, pool)
	waiterStore := newStore(t, pool, table, pgstore.WithRecheckInterval(time.Hour))
	ownerStore := newStore(t, pool, table)
	ctx := t.Context()

	for _, end := range []string{"complete", "release"} {
		k, tok := key("notify-"+end), token()
		if _, err := ownerStore.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil {
			t.Fatal(err)
		}
		seen, err := waiterStore.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour})
		if err != nil || seen.State != idempotency.Pending {
			t.Fatal(seen, err)
		}
		done := make(chan error, 1)
		go func() { done <- waiterStore.Wait(ctx, k, seen) }()
		waitListening(t, pool, table, 2)
		if end == "complete" {
			err = ownerStore.Complete(ctx, k, tok, []byte("done"), time.Hour)
		} else {
			err = ownerStore.Release(ctx, k, tok)
		}
		if err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Wait after %s: %v", end, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("Wait not woken by the %s's notification", end)
		}
	}
}

// waitListening waits until n backends listen on table's channel, counting
// the LISTEN statements of idle connections.
func waitListening(t *testing.T, pool *pgxpool.Pool, channel string, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var got int
		if err := pool.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity WHERE query = $1`,
			"LISTEN "+pgx.Identifier{channel}.Sanitize()).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections listen on %q, want %d", got, channel, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestListenerReconnects kills the waiter store's listening connection and
// checks that waiting still works through a notification, both for a Wait
// that was running during the outage and for one started after it.
func TestListenerReconnects(t *testing.T) {
	pool := newPool(t, nil)
	table := newTable(t, pool)
	waiterStore := newStore(t, pool, table, pgstore.WithRecheckInterval(time.Hour))
	ownerStore := newStore(t, pool, table)
	ctx := t.Context()
	waitListening(t, pool, table, 2)

	k, tok := key("reconnect"), token()
	if _, err := ownerStore.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil {
		t.Fatal(err)
	}
	seen, _ := waiterStore.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour})
	done := make(chan error, 1)
	go func() { done <- waiterStore.Wait(ctx, k, seen) }()

	// Both stores' listeners die; the owner's write happens while they
	// reconnect, so its notification may well be lost.
	if _, err := pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = $1`,
		"LISTEN "+pgx.Identifier{table}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	if err := ownerStore.Complete(ctx, k, tok, []byte("done"), time.Hour); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Wait across a reconnection: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a Wait running while the listener reconnected was never woken")
	}

	waitListening(t, pool, table, 2)
	k, tok = key("after-reconnect"), token()
	ownerStore.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour})
	seen, _ = waiterStore.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour})
	go func() { done <- waiterStore.Wait(ctx, k, seen) }()
	time.Sleep(50 * time.Millisecond) // let Wait register; it re-checks after, so either order passes
	if err := ownerStore.Release(ctx, k, tok); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Wait after the reconnection: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the reconnected listener did not deliver a notification")
	}
}

// TestWaitFallbackRecheck: a change made without a notification (a replica
// of an older version, or a lost one) is still seen, at the recheck interval.
func TestWaitFallbackRecheck(t *testing.T) {
	pool, table, s := setup(t, pgstore.WithRecheckInterval(100*time.Millisecond))
	ctx := t.Context()
	k, tok := key("fallback"), token()
	s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour})
	seen, _ := s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour})
	done := make(chan error, 1)
	go func() { done <- s.Wait(ctx, k, seen) }()
	if _, err := pool.Exec(ctx, "DELETE FROM "+pgx.Identifier{table}.Sanitize()+" WHERE key = $1", []byte(k)); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Wait never re-checked the key")
	}
}

// TestWaitKeepsWaitingOnRenewedLease: Wait wakes at the lease's end by the
// database's clock, and a lease renewed meanwhile keeps it waiting until a
// real change.
func TestWaitKeepsWaitingOnRenewedLease(t *testing.T) {
	_, _, s := setup(t, pgstore.WithRecheckInterval(time.Hour))
	ctx := t.Context()
	k, tok := key("renewed"), token()
	s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: 300 * time.Millisecond})
	seen, _ := s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour})
	if seen.State != idempotency.Pending {
		t.Skip("the machine is too slow: the 300ms lease ran out before the second Reserve")
	}
	if err := s.Renew(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil {
		t.Skip("the machine is too slow: the 300ms lease ran out before Renew")
	}
	done := make(chan error, 1)
	go func() { done <- s.Wait(ctx, k, seen) }()
	select {
	case err := <-done:
		t.Fatalf("Wait returned %v at the old lease's end, though the lease was renewed", err)
	case <-time.After(time.Until(seen.LeaseExpires) + time.Second):
	}
	if err := s.Complete(ctx, k, tok, []byte("done"), time.Hour); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Wait not woken by Complete")
	}
}

func countRows(t *testing.T, pool *pgxpool.Pool, table string) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(t.Context(), "SELECT count(*) FROM "+pgx.Identifier{table}.Sanitize()).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestSweep deletes expired rows in batches, skips locked ones without
// waiting for them, and keeps live ones.
func TestSweep(t *testing.T) {
	pool, table, s := setup(t, pgstore.WithSweepBatch(100))
	ctx := t.Context()
	tbl := pgx.Identifier{table}.Sanitize()
	_, err := pool.Exec(ctx, `INSERT INTO `+tbl+` (key, completed, token, record, expires_at)
		SELECT ('expired-' || i)::bytea, i % 2 = 0, 't', '', now() - interval '1 second' FROM generate_series(1, 1050) i`)
	if err != nil {
		t.Fatal(err)
	}
	_, err = pool.Exec(ctx, `INSERT INTO `+tbl+` (key, completed, token, record, expires_at)
		SELECT ('live-' || i)::bytea, i % 2 = 0, 't', '', now() + interval '1 hour' FROM generate_series(1, 20) i`)
	if err != nil {
		t.Fatal(err)
	}
	// A transaction holds one expired row, as a takeover in progress would.
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `SELECT 1 FROM `+tbl+` WHERE key = 'expired-7'::bytea FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	n, err := s.Sweep(sctx)
	if err != nil {
		t.Fatalf("Sweep: %v", err)
	}
	if n != 1049 {
		t.Fatalf("Sweep deleted %d rows, want 1049 (all expired but the locked one)", n)
	}
	if got := countRows(t, pool, table); got != 21 {
		t.Fatalf("%d rows left, want 20 live and 1 locked", got)
	}
	tx.Rollback(ctx)
	if n, err := s.Sweep(ctx); err != nil || n != 1 {
		t.Fatalf("second Sweep: %d, %v; want the formerly locked row", n, err)
	}
}

func TestBackgroundSweeper(t *testing.T) {
	pool, table, _ := setup(t) // migrated before the sweeper's first tick
	s := newStore(t, pool, table, pgstore.WithSweepInterval(20*time.Millisecond))
	ctx := t.Context()
	k, tok := key("swept"), token()
	s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour})
	if err := s.Complete(ctx, k, tok, []byte("short"), 50*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	live, tok2 := key("kept"), token()
	s.Reserve(ctx, live, idempotency.Claim{Token: tok2, Lease: time.Hour})
	deadline := time.Now().Add(30 * time.Second)
	for countRows(t, pool, table) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("the sweeper left %d rows, want only the live one", countRows(t, pool, table))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if e, _ := s.Lookup(ctx, live); e.State != idempotency.Pending {
		t.Fatalf("the live key: %v, want pending", e.State)
	}
}

// TestCloseKeepsPool: Close ends the store's work and wakes its waiters with
// ErrClosed, and leaves the caller's pool open.
func TestCloseKeepsPool(t *testing.T) {
	pool := newPool(t, nil)
	table := newTable(t, pool)
	s, err := pgstore.New(t.Context(), pool, pgstore.WithTable(table))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	k := key("close")
	s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour})
	seen, _ := s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour})
	done := make(chan error, 1)
	go func() { done <- s.Wait(ctx, k, seen) }()
	time.Sleep(20 * time.Millisecond) // let Wait block; it must end either way
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, idempotency.ErrClosed) {
			t.Fatalf("Wait during Close: %v, want ErrClosed", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not wake the waiter")
	}
	if _, err := s.Sweep(ctx); !errors.Is(err, idempotency.ErrClosed) {
		t.Fatalf("Sweep after Close: %v", err)
	}
	if err := s.Migrate(ctx); !errors.Is(err, idempotency.ErrClosed) {
		t.Fatalf("Migrate after Close: %v", err)
	}
	if err := pool.Ping(ctx); err != nil {
		t.Fatalf("the pool after the store's Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
