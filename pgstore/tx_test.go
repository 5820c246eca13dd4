package pgstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/pgstore"
)

// business is a table of the handler's own rows, one per charge.
type business struct {
	pool  *pgxpool.Pool
	table string
}

func newBusiness(t *testing.T, pool *pgxpool.Pool) business {
	t.Helper()
	b := business{pool: pool, table: newTable(t, pool)}
	if _, err := pool.Exec(t.Context(), "CREATE TABLE "+b.ident()+" (charge text PRIMARY KEY, idem_key text NOT NULL)"); err != nil {
		t.Fatal(err)
	}
	return b
}

func (b business) ident() string { return pgx.Identifier{b.table}.Sanitize() }

func (b business) insert(ctx context.Context, tx pgx.Tx, idemKey string) error {
	_, err := tx.Exec(ctx, "INSERT INTO "+b.ident()+" (charge, idem_key) VALUES ($1, $2)", randomHex(8), idemKey)
	return err
}

// rows counts the committed rows written for idemKey.
func (b business) rows(t *testing.T, idemKey string) int {
	t.Helper()
	var n int
	if err := b.pool.QueryRow(t.Context(), "SELECT count(*) FROM "+b.ident()+" WHERE idem_key = $1", idemKey).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// execution reserves k under a fresh token and returns the context the
// interceptor would give the handler, and Complete and Release.
func execution(t *testing.T, s *pgstore.Store, k string, lease time.Duration) (context.Context, string) {
	t.Helper()
	tok := token()
	e, err := s.Reserve(t.Context(), k, idempotency.Claim{Token: tok, Lease: lease})
	if err != nil {
		t.Fatal(err)
	}
	if e.State != idempotency.Acquired {
		t.Fatalf("Reserve: %v, want acquired", e.State)
	}
	ctx := idempotency.ContextWithExecution(t.Context(), &idempotency.Execution{
		Method: "/idempotency.testing.v1.PaymentService/Charge", Key: k, StoreKey: k, Token: tok,
	})
	return context.WithoutCancel(ctx), tok
}

// beginWithRow starts an execution of k, begins its transaction and writes
// the business row in it, as a handler in transactional mode does.
func beginWithRow(t *testing.T, s *pgstore.Store, biz business, k string, lease time.Duration) (context.Context, string, pgx.Tx) {
	t.Helper()
	ctx, tok := execution(t, s, k, lease)
	tx, err := s.BeginTx(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := biz.insert(ctx, tx, k); err != nil {
		t.Fatal(err)
	}
	return ctx, tok, tx
}

func wantRolledBack(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, idempotency.ErrRolledBack) {
		t.Fatalf("%s: %v, want an error wrapping ErrRolledBack", what, err)
	}
	if errors.Is(err, idempotency.ErrNotOwner) {
		t.Fatalf("%s: %v wraps ErrNotOwner too; only ErrRolledBack may decide the answer", what, err)
	}
}

// TestTxCommitsWithRecord (a): the handler's row and the record become
// visible together, at Complete, and waiters are woken at the commit.
func TestTxCommitsWithRecord(t *testing.T) {
	pool, _, s := setup(t, pgstore.WithRecheckInterval(time.Hour))
	biz := newBusiness(t, pool)
	k := key("tx-commit")
	ctx, tok := execution(t, s, k, time.Hour)

	tx, err := s.BeginTx(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := s.BeginTx(ctx); err != nil || again != tx {
		t.Fatalf("second BeginTx in one execution: %v, %v; want the same transaction", again, err)
	}
	if err := biz.insert(ctx, tx, k); err != nil {
		t.Fatal(err)
	}
	// A handler's habits must not end the transaction.
	if err := tx.Commit(ctx); !errors.Is(err, pgstore.ErrManagedTx) {
		t.Fatalf("handler's Commit: %v, want ErrManagedTx", err)
	}
	if err := tx.Rollback(ctx); !errors.Is(err, pgstore.ErrManagedTx) {
		t.Fatalf("handler's Rollback: %v, want ErrManagedTx", err)
	}
	if n := biz.rows(t, k); n != 0 {
		t.Fatalf("%d business rows visible before Complete, want 0", n)
	}

	seen, _ := s.Reserve(t.Context(), k, idempotency.Claim{Token: token(), Lease: time.Hour})
	done := make(chan error, 1)
	go func() { done <- s.Wait(t.Context(), k, seen) }()
	time.Sleep(50 * time.Millisecond) // let Wait register; it re-checks after, so either order passes

	if err := s.Complete(ctx, k, tok, []byte("record"), time.Hour); err != nil {
		t.Fatalf("Complete: %v", err)
	}
	if n := biz.rows(t, k); n != 1 {
		t.Fatalf("%d business rows after Complete, want 1", n)
	}
	if e, _ := s.Lookup(t.Context(), k); e.State != idempotency.Completed || string(e.Record) != "record" {
		t.Fatalf("Lookup after Complete: %+v", e)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the waiter was not woken by the transactional Complete")
	}
	if _, err := s.BeginTx(ctx); !errors.Is(err, pgstore.ErrExecutionDone) {
		t.Fatalf("BeginTx after Complete: %v, want ErrExecutionDone", err)
	}
	// The transaction's connection went back to the pool.
	wantConnsBack(t, pool)
}

// TestTxKilledMidway (b): the handler's backend dies after its write (a crash
// of the server, the network or the database session). Neither the row nor
// the record persists, and the retry runs again and succeeds, once.
func TestTxKilledMidway(t *testing.T) {
	for _, how := range []string{"terminate", "cancel"} {
		t.Run(how, func(t *testing.T) {
			pool, _, s := setup(t)
			biz := newBusiness(t, pool)
			k := key("tx-killed")
			ctx, tok, tx := beginWithRow(t, s, biz, k, time.Hour)
			var pid uint32
			if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
				t.Fatal(err)
			}
			switch how {
			case "terminate":
				var ok bool
				if err := pool.QueryRow(t.Context(), "SELECT pg_terminate_backend($1)", pid).Scan(&ok); err != nil || !ok {
					t.Fatalf("pg_terminate_backend: %v, %v", ok, err)
				}
			case "cancel":
				// The handler's context ends during a long statement.
				qctx, cancel := context.WithCancel(t.Context())
				go func() { time.Sleep(100 * time.Millisecond); cancel() }()
				if _, err := tx.Exec(qctx, "SELECT pg_sleep(60)"); err == nil {
					t.Fatal("pg_sleep(60) finished despite the cancellation")
				}
			}

			err := s.Complete(ctx, k, tok, []byte("record"), time.Hour)
			wantRolledBack(t, "Complete after the handler's session died", err)
			if n := biz.rows(t, k); n != 0 {
				t.Fatalf("%d business rows after the kill, want 0", n)
			}
			// The key is still pending under the dead execution; the
			// interceptor releases it after ErrRolledBack.
			if e, _ := s.Lookup(t.Context(), k); e.State != idempotency.Pending || e.Token != tok {
				t.Fatalf("Lookup after the failed Complete: %+v, want pending under the dead token", e)
			}
			if err := s.Release(ctx, k, tok); err != nil {
				t.Fatalf("Release after ErrRolledBack: %v", err)
			}

			// The retry.
			ctx, tok, _ = beginWithRow(t, s, biz, k, time.Hour)
			if err := s.Complete(ctx, k, tok, []byte("record"), time.Hour); err != nil {
				t.Fatalf("Complete of the retry: %v", err)
			}
			if n := biz.rows(t, k); n != 1 {
				t.Fatalf("%d business rows after the retry, want 1", n)
			}
			if e, _ := s.Reserve(t.Context(), k, idempotency.Claim{Token: token(), Lease: time.Hour}); e.State != idempotency.Completed {
				t.Fatalf("Reserve after the retry: %v, want completed", e.State)
			}
		})
	}
}

// TestTxCrashedOwnerLeaseRunsOut: the owner's process is gone (nobody calls
// Complete or Release); its session's death rolls the writes back, the
// lease runs out, and a retry takes over and commits once.
func TestTxCrashedOwnerLeaseRunsOut(t *testing.T) {
	pool, _, s := setup(t)
	biz := newBusiness(t, pool)
	k := key("tx-crash")
	ctx, tok := execution(t, s, k, 300*time.Millisecond)
	tx, err := s.BeginTx(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// In this process the dead owner's transaction still holds a pool
	// connection (a crashed process would hold nothing); hand it back so
	// that the pool can close. By then the key is another owner's.
	defer func() {
		if err := s.Release(ctx, k, tok); !errors.Is(err, idempotency.ErrNotOwner) {
			t.Errorf("Release by the crashed owner after the takeover: %v, want ErrNotOwner", err)
		}
	}()
	if err := biz.insert(ctx, tx, k); err != nil {
		t.Fatal(err)
	}
	var pid uint32
	tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid)
	pool.Exec(t.Context(), "SELECT pg_terminate_backend($1)", pid)

	deadline := time.Now().Add(30 * time.Second)
	var retryCtx context.Context
	var retryTok string
	for {
		tok := token()
		e, err := s.Reserve(t.Context(), k, idempotency.Claim{Token: tok, Lease: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		if e.State == idempotency.Acquired {
			retryTok = tok
			retryCtx = context.WithoutCancel(idempotency.ContextWithExecution(t.Context(),
				&idempotency.Execution{Key: k, StoreKey: k, Token: tok}))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the crashed owner's lease never ran out: %+v", e)
		}
		if err := s.Wait(t.Context(), k, e); err != nil {
			t.Fatal(err)
		}
	}
	tx2, err := s.BeginTx(retryCtx)
	if err != nil {
		t.Fatal(err)
	}
	if err := biz.insert(retryCtx, tx2, k); err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(retryCtx, k, retryTok, []byte("record"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if n := biz.rows(t, k); n != 1 {
		t.Fatalf("%d business rows, want 1", n)
	}
}

// TestTxLeaseLost (c): the owner's lease runs out mid-handler and another
// owner takes the key over. The stale owner's Complete must roll its writes
// back, and the new owner's outcome stands.
func TestTxLeaseLost(t *testing.T) {
	pool, table, s := setup(t)
	other := newStore(t, pool, table) // a second replica on the same table
	biz := newBusiness(t, pool)
	k := key("tx-lease-lost")
	ctx, tok, _ := beginWithRow(t, s, biz, k, 200*time.Millisecond)

	// Another owner takes over once the lease has run out.
	newTok := token()
	deadline := time.Now().Add(30 * time.Second)
	for {
		e, err := other.Reserve(t.Context(), k, idempotency.Claim{Token: newTok, Lease: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		if e.State == idempotency.Acquired {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the lease never ran out: %+v", e)
		}
		time.Sleep(20 * time.Millisecond)
	}

	err := s.Complete(ctx, k, tok, []byte("stale"), time.Hour)
	wantRolledBack(t, "Complete by the owner whose lease was taken over", err)
	if n := biz.rows(t, k); n != 0 {
		t.Fatalf("%d business rows of the stale owner, want 0", n)
	}
	if e, _ := s.Lookup(t.Context(), k); e.State != idempotency.Pending || e.Token != newTok {
		t.Fatalf("Lookup: %+v, want still pending under the new owner", e)
	}
	if err := other.Complete(t.Context(), k, newTok, []byte("fresh"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if e, _ := s.Lookup(t.Context(), k); string(e.Record) != "fresh" {
		t.Fatalf("record %q, want the new owner's", e.Record)
	}
}

// TestTxReleaseRollsBack: an outcome that is not stored takes the handler's
// writes with it.
func TestTxReleaseRollsBack(t *testing.T) {
	pool, _, s := setup(t)
	biz := newBusiness(t, pool)
	k := key("tx-release")
	ctx, tok, _ := beginWithRow(t, s, biz, k, time.Hour)
	if err := s.Release(ctx, k, tok); err != nil {
		t.Fatal(err)
	}
	if n := biz.rows(t, k); n != 0 {
		t.Fatalf("%d business rows after Release, want 0", n)
	}
	if e, _ := s.Lookup(t.Context(), k); e.State != idempotency.Absent {
		t.Fatalf("Lookup after Release: %v, want absent", e.State)
	}
	wantConnsBack(t, pool)
}

// TestTxHandlerMisuse: a transaction left aborted by a failed statement, or
// ended behind the store's back, is reported at Complete, with nothing
// stored.
func TestTxHandlerMisuse(t *testing.T) {
	for name, misuse := range map[string]func(ctx context.Context, tx pgx.Tx){
		"failed statement": func(ctx context.Context, tx pgx.Tx) { tx.Exec(ctx, "SELECT 1/0") },
		"raw COMMIT":       func(ctx context.Context, tx pgx.Tx) { tx.Exec(ctx, "COMMIT") },
		"raw ROLLBACK":     func(ctx context.Context, tx pgx.Tx) { tx.Exec(ctx, "ROLLBACK") },
	} {
		t.Run(name, func(t *testing.T) {
			pool, _, s := setup(t)
			biz := newBusiness(t, pool)
			k := key("tx-misuse")
			ctx, tok, tx := beginWithRow(t, s, biz, k, time.Hour)
			misuse(ctx, tx)
			wantRolledBack(t, "Complete", s.Complete(ctx, k, tok, []byte("record"), time.Hour))
			if e, _ := s.Lookup(t.Context(), k); e.State == idempotency.Completed {
				t.Fatal("a record was stored for a transaction the handler broke")
			}
			wantConnsBack(t, pool)
		})
	}
}

func TestBeginTxNeedsExecution(t *testing.T) {
	_, _, s := setup(t)
	if _, err := s.BeginTx(t.Context()); !errors.Is(err, pgstore.ErrNoExecution) {
		t.Fatalf("BeginTx without an execution: %v, want ErrNoExecution", err)
	}
}

// TestTxOtherExecutionsKey: a record for another key than the transaction's
// execution is refused, and the transaction rolled back.
func TestTxOtherExecutionsKey(t *testing.T) {
	pool, _, s := setup(t)
	biz := newBusiness(t, pool)
	k := key("tx-mine")
	ctx, tok := execution(t, s, k, time.Hour)
	tx, _ := s.BeginTx(ctx)
	biz.insert(ctx, tx, k)
	other := key("tx-other")
	s.Reserve(t.Context(), other, idempotency.Claim{Token: tok, Lease: time.Hour})
	wantRolledBack(t, "Complete of another key", s.Complete(ctx, other, tok, []byte("r"), time.Hour))
	if n := biz.rows(t, k); n != 0 {
		t.Fatalf("%d business rows, want 0", n)
	}
}

// wantConnsBack checks that the handler's transaction gave its connection
// back to the pool. The store's background work (notifications, a waiter's
// look) borrows connections briefly, so it waits for them too.
func wantConnsBack(t *testing.T, pool *pgxpool.Pool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for pool.Stat().AcquiredConns() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still acquired after the call ended", pool.Stat().AcquiredConns())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
