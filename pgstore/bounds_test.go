package pgstore_test

import (
	"context"
	"crypto/rand"
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/pgstore"
)

// TestDurationBounds: the longest lease and retention a Store must hold,
// idempotency.MaxRetention, are written exactly and make live rows, by the
// database's arithmetic; every duration outside (0, MaxRetention] is refused
// with a clear error and changes nothing. Before, micros() overflowed for
// math.MaxInt64 and wrote rows already expired, so every duplicate ran.
func TestDurationBounds(t *testing.T) {
	pool, table, s := setup(t)
	biz := newBusiness(t, pool)
	ctx := t.Context()
	tbl := pgx.Identifier{table}.Sanitize()
	// span is expires_at - created_at of k's row, as the database computes
	// it: exactly the lease or retention written.
	span := func(k string) time.Duration {
		t.Helper()
		var us int64
		err := pool.QueryRow(ctx, `SELECT (extract(epoch FROM expires_at - created_at) * 1000000)::bigint FROM `+tbl+` WHERE key = $1`, []byte(k)).Scan(&us)
		if err != nil {
			t.Fatal(err)
		}
		return time.Duration(us) * time.Microsecond
	}
	const longest = idempotency.MaxRetention
	wantAbout := func(what string, got time.Time, from time.Time) {
		t.Helper()
		if d := got.Sub(from); d < longest-10*time.Second || d > longest+10*time.Second {
			t.Fatalf("%s is %v from now, want %v", what, d, longest)
		}
	}

	t.Run("MaxRetention", func(t *testing.T) {
		k, tok := key("longest-lease"), token()
		now := time.Now()
		e, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: longest})
		if err != nil || e.State != idempotency.Acquired {
			t.Fatalf("Reserve with a lease of MaxRetention: %+v, %v", e, err)
		}
		wantAbout("LeaseExpires", e.LeaseExpires, now)
		if got := span(k); got != longest {
			t.Fatalf("lease written as %v, want %v", got, longest)
		}
		if e, _ := s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour}); e.State != idempotency.Pending || e.Token != tok {
			t.Fatalf("a duplicate's Reserve: %+v, want pending under the owner", e)
		}

		k, tok = key("longest-renew"), token()
		if err := s.Renew(ctx, k, idempotency.Claim{Token: tok, Lease: longest}); err != nil {
			t.Fatalf("Renew (taking back) with a lease of MaxRetention: %v", err)
		}
		if got := span(k); got != longest {
			t.Fatalf("renewed lease written as %v, want %v", got, longest)
		}
		if e, _ := s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour}); e.State != idempotency.Pending || e.Token != tok {
			t.Fatalf("a duplicate's Reserve after Renew: %+v, want pending under the owner", e)
		}

		k, tok = key("longest-retention"), token()
		s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour})
		now = time.Now()
		if err := s.Complete(ctx, k, tok, []byte("kept ten years"), longest); err != nil {
			t.Fatalf("Complete with a retention of MaxRetention: %v", err)
		}
		e, err = s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour})
		if err != nil || e.State != idempotency.Completed || string(e.Record) != "kept ten years" {
			t.Fatalf("a duplicate's Reserve after Complete: %+v, %v; want the record", e, err)
		}
		wantAbout("Expires", e.Expires, now)
		if got := span(k); got != longest {
			t.Fatalf("retention written as %v, want %v", got, longest)
		}

		k = key("longest-retention-tx")
		txCtx, tok, _ := beginWithRow(t, s, biz, k, time.Hour)
		if err := s.Complete(txCtx, k, tok, []byte("tx"), longest); err != nil {
			t.Fatalf("transactional Complete with a retention of MaxRetention: %v", err)
		}
		if got := span(k); got != longest {
			t.Fatalf("retention written in the handler's transaction as %v, want %v", got, longest)
		}
		if n := biz.rows(t, k); n != 1 {
			t.Fatalf("%d business rows, want 1", n)
		}
	})

	for _, d := range []time.Duration{0, -time.Nanosecond, longest + time.Nanosecond, math.MaxInt64, math.MinInt64} {
		t.Run("refused "+d.String(), func(t *testing.T) {
			wantRefused := func(what string, err error) {
				t.Helper()
				if err == nil || errors.Is(err, idempotency.ErrNotOwner) || !strings.Contains(err.Error(), "out of range") {
					t.Fatalf("%s with %v: %v, want an error saying it is out of range", what, d, err)
				}
			}
			k := key("refused")
			_, err := s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: d})
			wantRefused("Reserve", err)
			if e, _ := s.Lookup(ctx, k); e.State != idempotency.Absent {
				t.Fatalf("after a refused Reserve: %v, want absent", e.State)
			}
			wantRefused("Renew of an absent key", s.Renew(ctx, k, idempotency.Claim{Token: token(), Lease: d}))
			if e, _ := s.Lookup(ctx, k); e.State != idempotency.Absent {
				t.Fatalf("after a refused Renew: %v, want absent", e.State)
			}

			tok := token()
			e, _ := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour})
			wantRefused("Renew", s.Renew(ctx, k, idempotency.Claim{Token: tok, Lease: d}))
			wantRefused("Complete", s.Complete(ctx, k, tok, []byte("r"), d))
			if after, _ := s.Lookup(ctx, k); after.State != idempotency.Pending || after.Token != tok || after.LeaseExpires.Sub(e.LeaseExpires).Abs() > time.Second {
				t.Fatalf("after a refused Renew and Complete: %+v, want the lease as it was, %v", after, e.LeaseExpires)
			}

			k = key("refused-tx")
			txCtx, tok, _ := beginWithRow(t, s, biz, k, time.Hour)
			err = s.Complete(txCtx, k, tok, []byte("r"), d)
			wantRolledBack(t, "transactional Complete", err)
			wantRefused("transactional Complete", err)
			if n := biz.rows(t, k); n != 0 {
				t.Fatalf("%d business rows after a refused transactional Complete, want 0", n)
			}
		})
	}
}

// randomKey returns a store key of exactly n bytes whose tail is random, so
// that PostgreSQL cannot compress it under its index's size limit.
func randomKey(n int) string {
	prefix := key("long") + "/"
	b := make([]byte, n-len(prefix))
	rand.Read(b)
	return prefix + string(b)
}

// txWithRow begins the transaction of an execution of k under tok (reserved
// or not) and writes a business row tagged label in it. If the test ends
// before the store ended the transaction, it is rolled back.
func txWithRow(t *testing.T, s *pgstore.Store, biz business, k, tok, label string) context.Context {
	t.Helper()
	exec := &idempotency.Execution{Method: "/idempotency.testing.v1.PaymentService/Charge", Key: label, StoreKey: k, Token: tok}
	ctx := context.WithoutCancel(idempotency.ContextWithExecution(t.Context(), exec))
	tx, err := s.BeginTx(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Release(ctx, k, tok) })
	if err := biz.insert(ctx, tx, label); err != nil {
		t.Fatal(err)
	}
	return ctx
}

// TestStoreKeyBounds: a store key of idempotency.MaxStoreKeyLength random
// bytes fits the primary key's btree (whose limit, about 2700 bytes, is
// shown to be real), and works in every operation; a longer one is refused
// by every writing operation with an error wrapping ErrKeyTooLong, before it
// reaches the database.
func TestStoreKeyBounds(t *testing.T) {
	pool, table, s := setup(t)
	biz := newBusiness(t, pool)
	ctx := t.Context()
	tbl := pgx.Identifier{table}.Sanitize()

	t.Run("the btree limit is real", func(t *testing.T) {
		_, err := pool.Exec(ctx, `INSERT INTO `+tbl+` (key, token, expires_at) VALUES ($1, 't', now() + interval '1 hour')`, []byte(randomKey(3000)))
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "54000" {
			t.Fatalf("a 3000-byte random key, written directly: %v; want the index's size limit (54000)", err)
		}
		t.Logf("PostgreSQL: %s", pgErr.Message)
	})

	t.Run("longest", func(t *testing.T) {
		k, tok := randomKey(idempotency.MaxStoreKeyLength), token()
		last := []byte(k)
		last[len(last)-1] ^= 1
		sibling := string(last)
		if e, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Fingerprint: []byte("fp"), Lease: time.Hour}); err != nil || e.State != idempotency.Acquired {
			t.Fatalf("Reserve of a %d-byte key: %+v, %v", len(k), e, err)
		}
		if err := s.Renew(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil {
			t.Fatalf("Renew: %v", err)
		}
		if e, _ := s.Lookup(ctx, sibling); e.State != idempotency.Absent {
			t.Fatalf("a key differing in its last byte: %v, want absent", e.State)
		}
		if err := s.Complete(ctx, k, tok, []byte("long"), time.Hour); err != nil {
			t.Fatalf("Complete: %v", err)
		}
		if e, err := s.Reserve(ctx, k, idempotency.Claim{Token: token(), Lease: time.Hour}); err != nil || e.State != idempotency.Completed || string(e.Record) != "long" {
			t.Fatalf("Reserve after Complete: %+v, %v", e, err)
		}
		// Released, the sibling can be taken back by its owner's Renew.
		tok = token()
		s.Reserve(ctx, sibling, idempotency.Claim{Token: tok, Lease: time.Hour})
		s.Release(ctx, sibling, tok)
		if err := s.Renew(ctx, sibling, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil {
			t.Fatalf("Renew taking a %d-byte key back: %v", len(sibling), err)
		}

		k, tok = randomKey(idempotency.MaxStoreKeyLength), token()
		if e, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}); err != nil || e.State != idempotency.Acquired {
			t.Fatalf("Reserve of a %d-byte key: %+v, %v", len(k), e, err)
		}
		txCtx := txWithRow(t, s, biz, k, tok, "longest")
		if err := s.Complete(txCtx, k, tok, []byte("tx"), time.Hour); err != nil {
			t.Fatalf("transactional Complete of a %d-byte key: %v", len(k), err)
		}
		if n := biz.rows(t, "longest"); n != 1 {
			t.Fatalf("%d business rows, want 1", n)
		}
	})

	t.Run("too long", func(t *testing.T) {
		k, tok := randomKey(idempotency.MaxStoreKeyLength+1), token()
		wantTooLong := func(what string, err error) {
			t.Helper()
			if !errors.Is(err, idempotency.ErrKeyTooLong) {
				t.Fatalf("%s of a %d-byte key: %v, want an error wrapping ErrKeyTooLong", what, len(k), err)
			}
		}
		_, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour})
		wantTooLong("Reserve", err)
		wantTooLong("Renew", s.Renew(ctx, k, idempotency.Claim{Token: tok, Lease: time.Hour}))
		wantTooLong("Complete", s.Complete(ctx, k, tok, []byte("r"), time.Hour))

		// A handler's transaction cannot commit without its record.
		txCtx := txWithRow(t, s, biz, k, tok, "too long")
		err = s.Complete(txCtx, k, tok, []byte("r"), time.Hour)
		wantRolledBack(t, "transactional Complete", err)
		wantTooLong("transactional Complete", err)
		if n := biz.rows(t, "too long"); n != 0 {
			t.Fatalf("%d business rows, want 0", n)
		}
		if _, err := s.BeginTx(txCtx); !errors.Is(err, pgstore.ErrExecutionDone) {
			t.Fatalf("BeginTx after the refused Complete: %v, want ErrExecutionDone", err)
		}
		var n int
		pool.QueryRow(ctx, `SELECT count(*) FROM `+tbl+` WHERE length(key) > $1`, idempotency.MaxStoreKeyLength).Scan(&n)
		if n != 0 {
			t.Fatalf("%d rows with keys over the limit", n)
		}
	})
}
