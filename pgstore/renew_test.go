package pgstore_test

import (
	"bytes"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/grpcidem/idempotency"
)

// TestRenewTakesBack: Renew extends the owner's lease, and takes back a key
// that is absent in every way a shared table shows it (no row, the owner's
// expired row, another owner's expired lease, an expired record), under the
// claim, fingerprint included. A live lease of another owner, or a live
// record, is refused with ErrNotOwner and left as it was.
func TestRenewTakesBack(t *testing.T) {
	pool, table, s := setup(t)
	ctx := t.Context()
	tbl := pgx.Identifier{table}.Sanitize()
	insert := func(k, sql string) {
		t.Helper()
		if _, err := pool.Exec(ctx, `INSERT INTO `+tbl+` (key, completed, token, fingerprint, record, expires_at) VALUES `+sql, []byte(k)); err != nil {
			t.Fatal(err)
		}
	}
	fp := []byte("the claim's fingerprint")

	for _, c := range []struct {
		name, row string // row: the VALUES of the key's row, or "" for none
	}{
		{"no row", ""},
		{"the owner's expired lease", `($1, false, 'OWNER', 'old fingerprint', NULL, now() - interval '1 second')`},
		{"another owner's expired lease", `($1, false, 'dead', 'dead fingerprint', NULL, now() - interval '1 second')`},
		{"an expired record of another owner", `($1, true, 'old', NULL, 'old record', now() - interval '1 second')`},
		{"an expired record of the owner", `($1, true, 'OWNER', NULL, 'old record', now() - interval '1 second')`},
	} {
		t.Run(c.name, func(t *testing.T) {
			k, tok := key("takeback"), token()
			if c.row != "" {
				insert(k, c.row)
				if _, err := pool.Exec(ctx, `UPDATE `+tbl+` SET token = $2 WHERE key = $1 AND token = 'OWNER'`, []byte(k), tok); err != nil {
					t.Fatal(err)
				}
			}
			before := time.Now()
			if err := s.Renew(ctx, k, idempotency.Claim{Token: tok, Fingerprint: fp, Lease: time.Hour}); err != nil {
				t.Fatalf("Renew: %v, want the key taken back", err)
			}
			e, err := s.Lookup(ctx, k)
			if err != nil || e.State != idempotency.Pending || e.Token != tok {
				t.Fatalf("Lookup after Renew: %+v, %v; want pending under the owner", e, err)
			}
			if !bytes.Equal(e.Fingerprint, fp) {
				t.Fatalf("fingerprint %q after Renew, want the claim's %q", e.Fingerprint, fp)
			}
			if d := e.LeaseExpires.Sub(before); d < time.Hour-5*time.Second || d > time.Hour+5*time.Second {
				t.Fatalf("lease ends %v after Renew, want an hour", d)
			}
			if e, err := s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour}); err != nil || e.State != idempotency.Pending || e.Token != tok {
				t.Fatalf("Reserve by another token after the take-back: %+v, %v; want pending under the owner", e, err)
			}
			if err := s.Complete(ctx, k, tok, []byte("taken back"), time.Hour); err != nil {
				t.Fatalf("Complete by the owner after the take-back: %v", err)
			}
		})
	}

	t.Run("keeps the fingerprint of a claim without one", func(t *testing.T) {
		// A client stream's claim has no fingerprint: the requests are
		// read after Reserve. Its renewals must not erase the one stored.
		k, tok := key("keep-fp"), token()
		if _, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Fingerprint: fp, Lease: time.Minute}); err != nil {
			t.Fatal(err)
		}
		if err := s.Renew(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil {
			t.Fatal(err)
		}
		if e, _ := s.Lookup(ctx, k); !bytes.Equal(e.Fingerprint, fp) || time.Until(e.LeaseExpires) < 50*time.Minute {
			t.Fatalf("after Renew without a fingerprint: %+v, want the stored fingerprint and an hour's lease", e)
		}
	})

	t.Run("refused", func(t *testing.T) {
		for _, c := range []struct{ name, row string }{
			{"another owner's live lease", `($1, false, 'other', 'other fingerprint', NULL, now() + interval '1 hour')`},
			{"another owner's live record", `($1, true, 'other', NULL, 'other record', now() + interval '1 hour')`},
			{"the owner's own live record", `($1, true, 'OWNER', NULL, 'own record', now() + interval '1 hour')`},
		} {
			k, tok := key("refused"), token()
			insert(k, c.row)
			pool.Exec(ctx, `UPDATE `+tbl+` SET token = $2 WHERE key = $1 AND token = 'OWNER'`, []byte(k), tok)
			var before string
			row := `SELECT concat_ws('|', completed, token, fingerprint, record, created_at, expires_at) FROM ` + tbl + ` WHERE key = $1`
			pool.QueryRow(ctx, row, []byte(k)).Scan(&before)
			err := s.Renew(ctx, k, idempotency.Claim{Token: tok, Fingerprint: fp, Lease: 3 * time.Hour})
			if !errors.Is(err, idempotency.ErrNotOwner) {
				t.Fatalf("Renew over %s: %v, want ErrNotOwner", c.name, err)
			}
			var after string
			pool.QueryRow(ctx, row, []byte(k)).Scan(&after)
			if after != before {
				t.Fatalf("Renew over %s changed the row:\n%s\nto\n%s", c.name, before, after)
			}
		}
	})
}

// TestRenewTakeBackRace: an owner's Renew and another caller's Reserve
// compete for a key whose lease ran out under a third, dead, owner: one
// after the other in both orders, then at once. Exactly one gets it, and
// the other sees that.
func TestRenewTakeBackRace(t *testing.T) {
	pool := newPool(t, func(c *pgxpool.Config) { c.MaxConns = 8 })
	table := newTable(t, pool)
	a, b := newStore(t, pool, table), newStore(t, pool, table)
	ctx := t.Context()
	tbl := pgx.Identifier{table}.Sanitize()
	expired := func() string {
		t.Helper()
		k := key("race")
		if _, err := pool.Exec(ctx, `INSERT INTO `+tbl+` (key, token, expires_at) VALUES ($1, 'dead', now() - interval '1 second')`, []byte(k)); err != nil {
			t.Fatal(err)
		}
		return k
	}

	k, owner, other := expired(), token(), token()
	if err := a.Renew(ctx, k, idempotency.Claim{Token: owner, Lease: time.Hour}); err != nil {
		t.Fatalf("Renew first: %v, want the key taken back", err)
	}
	if e, err := b.Reserve(ctx, k, idempotency.Claim{Token: other, Lease: time.Hour}); err != nil || e.State != idempotency.Pending || e.Token != owner {
		t.Fatalf("Reserve after the take-back: %+v, %v; want pending under the owner", e, err)
	}
	k = expired()
	if e, err := b.Reserve(ctx, k, idempotency.Claim{Token: other, Lease: time.Hour}); err != nil || e.State != idempotency.Acquired {
		t.Fatalf("Reserve first: %+v, %v; want acquired", e, err)
	}
	if err := a.Renew(ctx, k, idempotency.Claim{Token: owner, Lease: time.Hour}); !errors.Is(err, idempotency.ErrNotOwner) {
		t.Fatalf("Renew after the takeover: %v, want ErrNotOwner", err)
	}

	renewed, reserved := 0, 0
	for range 30 {
		k, owner, other := expired(), token(), token()
		var (
			wg       sync.WaitGroup
			start    = make(chan struct{})
			renewErr error
			e        idempotency.Entry
			resErr   error
		)
		wg.Go(func() {
			<-start
			renewErr = a.Renew(ctx, k, idempotency.Claim{Token: owner, Lease: time.Hour})
		})
		wg.Go(func() {
			<-start
			e, resErr = b.Reserve(ctx, k, idempotency.Claim{Token: other, Lease: time.Hour})
		})
		close(start)
		wg.Wait()
		if resErr != nil {
			t.Fatal(resErr)
		}
		switch {
		case renewErr == nil && e.State == idempotency.Pending && e.Token == owner:
			renewed++
		case errors.Is(renewErr, idempotency.ErrNotOwner) && e.State == idempotency.Acquired:
			reserved++
		default:
			t.Fatalf("Renew: %v; Reserve: %+v; want exactly one of them to hold the key", renewErr, e)
		}
		want := owner
		if e.State == idempotency.Acquired {
			want = other
		}
		if got, _ := a.Lookup(ctx, k); got.State != idempotency.Pending || got.Token != want {
			t.Fatalf("Lookup: %+v, want pending under %s", got, want)
		}
	}
	t.Logf("the renewal won %d races, the reservation %d", renewed, reserved)
}

// TestRenewIsOneStatement: extending, taking back and being refused each cost
// one statement.
func TestRenewIsOneStatement(t *testing.T) {
	counter := &queryCounter{tagged: true}
	pool := newPool(t, func(c *pgxpool.Config) { c.ConnConfig.Tracer = counter })
	s := newStore(t, pool, newTable(t, pool))
	ctx := t.Context()
	k, tok := key("renew-one"), token()
	if _, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil {
		t.Fatal(err)
	}
	statements := func(what string, claim idempotency.Claim, want error) {
		t.Helper()
		before := counter.n.Load()
		if err := s.Renew(counted(ctx), k, claim); !errors.Is(err, want) {
			t.Fatalf("%s: %v, want %v", what, err, want)
		}
		if n := counter.n.Load() - before; n != 1 {
			t.Fatalf("%s sent %d statements, want 1", what, n)
		}
	}
	statements("Renew of the owner's lease", idempotency.Claim{Token: tok, Lease: time.Hour}, nil)
	statements("Renew by another token", idempotency.Claim{Token: token(), Lease: time.Hour}, idempotency.ErrNotOwner)
	if err := s.Release(ctx, k, tok); err != nil {
		t.Fatal(err)
	}
	statements("Renew of a released key", idempotency.Claim{Token: tok, Lease: time.Hour}, nil)
}

// TestCompleteRetriedAfterLostReply: a Complete whose reply was lost (the
// connection died after the commit) is retried by the interceptor; the
// retry finds the owner's own record and succeeds, instead of reporting
// that another owner took the key.
func TestCompleteRetriedAfterLostReply(t *testing.T) {
	_, _, s := setup(t)
	ctx := t.Context()
	k, tok := key("complete-again"), token()
	if _, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(ctx, k, tok, []byte("outcome"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(ctx, k, tok, []byte("outcome"), time.Hour); err != nil {
		t.Fatalf("the owner's retried Complete: %v, want nil", err)
	}
	if err := s.Complete(ctx, k, token(), []byte("intruder"), time.Hour); !errors.Is(err, idempotency.ErrNotOwner) {
		t.Fatalf("Complete by another token: %v, want ErrNotOwner", err)
	}
	if e, _ := s.Lookup(ctx, k); e.State != idempotency.Completed || string(e.Record) != "outcome" {
		t.Fatalf("Lookup: %+v, want the owner's record", e)
	}
}
