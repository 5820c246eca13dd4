package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/grpcidem/idempotency"
)

func testConcurrencyOneWinner(t *testing.T, s *suite) {
	st := s.open(t)
	s.checkOneWinner(t, []idempotency.Store{st})
}

// checkOneWinner has 64 goroutines, spread over stores, reserve one key at
// the same moment: exactly one may acquire it, and every other must see it
// pending under the winner. Then the winner completes, and 64 goroutines
// reserve again at once: all must get the record.
func (s *suite) checkOneWinner(t *testing.T, stores []idempotency.Store) {
	t.Helper()
	const n = 64
	key, fp := newKey("one-winner"), newFingerprint()
	tokens := make([]string, n)
	for i := range tokens {
		tokens[i] = newToken()
	}
	entries, errs := make([]idempotency.Entry, n), make([]error, n)
	race := func(reserveOne func(i int)) {
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				<-start
				reserveOne(i)
			})
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("concurrent Reserve #%d: %v", i, err)
			}
		}
	}

	race(func(i int) {
		ctx := ownerCtx(t.Context(), key, tokens[i])
		entries[i], errs[i] = stores[i%len(stores)].Reserve(ctx, key, idempotency.Claim{Token: tokens[i], Fingerprint: fp, Lease: longLease})
	})
	winner := -1
	for i, e := range entries {
		if e.State != idempotency.Acquired {
			continue
		}
		if winner >= 0 {
			t.Fatalf("%d concurrent Reserves of one key: #%d and #%d both acquired it", n, winner, i)
		}
		winner = i
	}
	if winner < 0 {
		t.Fatalf("%d concurrent Reserves of one key: none acquired it; the first saw %s", n, describe(entries[0]))
	}
	wantAcquired(t, "the winning Reserve", entries[winner], tokens[winner])
	for i, e := range entries {
		if i != winner {
			s.wantPending(t, fmt.Sprintf("concurrent Reserve #%d, which lost", i), e, entries[winner], fp)
		}
	}

	rec := randomBytes(1000)
	wantOK(t, "Complete by the winner", complete(t, stores[0], key, tokens[winner], rec, longRetention))
	race(func(i int) {
		tok := newToken()
		ctx := ownerCtx(t.Context(), key, tok)
		entries[i], errs[i] = stores[i%len(stores)].Reserve(ctx, key, idempotency.Claim{Token: tok, Lease: longLease})
	})
	for i, e := range entries {
		wantCompleted(t, fmt.Sprintf("concurrent Reserve #%d after Complete", i), e, rec)
	}
}

func testConcurrencyManyKeys(t *testing.T, s *suite) {
	st := s.open(t)
	const goroutines, keysEach = 8, 16
	errs := make(chan error, goroutines)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() { errs <- cycleKeys(t.Context(), st, fmt.Sprint("many-keys-", g), keysEach) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// cycleKeys takes n keys of its own through Reserve, Complete and Reserve
// again, and reports the first step that went wrong: keys changed at the
// same time by other goroutines must not bleed into each other.
func cycleKeys(ctx context.Context, st idempotency.Store, name string, n int) error {
	type item struct {
		key, tok string
		rec      []byte
	}
	items := make([]item, n)
	for i := range items {
		it := item{key: newKey(fmt.Sprint(name, "-", i)), tok: newToken(), rec: randomBytes(50 + i)}
		items[i] = it
		e, err := st.Reserve(ownerCtx(ctx, it.key, it.tok), it.key, idempotency.Claim{Token: it.tok, Lease: longLease})
		if err != nil {
			return fmt.Errorf("Reserve(%s): %v", quote(it.key), err)
		}
		if e.State != idempotency.Acquired || e.Token != it.tok {
			return fmt.Errorf("Reserve(%s) of a fresh key: got %s, want acquired under %q", quote(it.key), describe(e), it.tok)
		}
	}
	for _, it := range items {
		if err := st.Complete(context.WithoutCancel(ownerCtx(ctx, it.key, it.tok)), it.key, it.tok, it.rec, longRetention); err != nil {
			return fmt.Errorf("Complete(%s) by its owner: %v", quote(it.key), err)
		}
	}
	for _, it := range items {
		tok := newToken()
		e, err := st.Reserve(ownerCtx(ctx, it.key, tok), it.key, idempotency.Claim{Token: tok, Lease: longLease})
		if err != nil {
			return fmt.Errorf("Reserve(%s) after Complete: %v", quote(it.key), err)
		}
		if e.State != idempotency.Completed || !bytes.Equal(e.Record, it.rec) {
			return fmt.Errorf("Reserve(%s) after Complete: got %s, want completed with %s", quote(it.key), describe(e), abbrev(it.rec))
		}
	}
	return nil
}

func testDataLargeRecords(t *testing.T, s *suite) {
	st := s.open(t)
	for _, size := range []int{1 << 20, 4 << 20} {
		key, tok, rec := newKey(fmt.Sprint("large-", size)), newToken(), randomBytes(size)
		want := bytes.Clone(rec)
		reserve(t, st, key, tok, nil, longLease)
		wantOK(t, fmt.Sprintf("Complete with a %d-byte record", size), complete(t, st, key, tok, rec, longRetention))
		wantCompleted(t, fmt.Sprintf("Reserve of a %d-byte record", size), reserve(t, st, key, newToken(), nil, longLease), want)
		wantCompleted(t, fmt.Sprintf("Lookup of a %d-byte record", size), lookup(t, st, key), want)
	}
}

func testDataEmptyRecord(t *testing.T, s *suite) {
	st := s.open(t)
	for _, rec := range [][]byte{{}, nil} {
		what := "an empty record"
		if rec == nil {
			what = "a nil record"
		}
		key, tok := newKey("empty-record"), newToken()
		reserve(t, st, key, tok, nil, longLease)
		wantOK(t, "Complete with "+what, complete(t, st, key, tok, rec, longRetention))
		// Completed, not absent: an empty outcome is still an outcome.
		wantCompleted(t, "Lookup of "+what, lookup(t, st, key), nil)
		wantCompleted(t, "Reserve of "+what, reserve(t, st, key, newToken(), nil, longLease), nil)
	}
}

func testDataBinaryKeys(t *testing.T, s *suite) {
	st := s.open(t)
	prefix := newKey("binary-keys")
	all := make([]byte, 256)
	for i := range all {
		all[i] = byte(i)
	}
	// The longest store key the interceptors make; a Store must hold it.
	long := strings.Repeat("k", idempotency.MaxStoreKeyLength-len(prefix))
	suffixes := []string{
		"",
		"\x00",
		"\x00a",
		"\x00b", // differs from the one above only after a NUL
		"\x00\x00",
		"\xff",
		"\xff\xfe\xfd",
		"\xc3\x28",         // not UTF-8
		"\xed\xa0\x80",     // a UTF-16 surrogate, not UTF-8
		"%00",              // what a careless escaper makes of a NUL
		"\\x00",            // likewise
		"/../\r\n\t \"'*?", // what a careless path or query builder trips on
		string(all),
		long,
		long[1:] + "j", // as long, differing only in the last byte
		strings.ToUpper(long),
	}
	keys := make([]string, len(suffixes))
	recs := make([][]byte, len(suffixes))
	for i, suffix := range suffixes {
		keys[i] = prefix + suffix
		recs[i] = []byte(fmt.Sprintf("record %d %x", i, randomBytes(8)))
	}
	// Each key is absent until it is reserved, however many keys that
	// look alike are already completed.
	for i, key := range keys {
		what := fmt.Sprintf("key %d %s", i, quote(key))
		wantState(t, "Lookup of "+what+" before its Reserve", lookup(t, st, key), idempotency.Absent)
		tok := newToken()
		wantAcquired(t, "Reserve of "+what, reserve(t, st, key, tok, nil, longLease), tok)
		wantOK(t, "Complete of "+what, complete(t, st, key, tok, recs[i], longRetention))
	}
	for i, key := range keys {
		what := fmt.Sprintf("key %d %s", i, quote(key))
		wantCompleted(t, "Lookup of "+what, lookup(t, st, key), recs[i])
		wantCompleted(t, "Reserve of "+what, reserve(t, st, key, newToken(), nil, longLease), recs[i])
	}
}

func testDataBinaryValues(t *testing.T, s *suite) {
	st := s.open(t)
	all := make([]byte, 512)
	for i := range all {
		all[i] = byte(255 - i%256)
	}
	fp := append([]byte{0, 0xff, 0, '\\', 'x', 0}, randomBytes(26)...)
	key, tok := newKey("binary-values"), newToken()
	owner := reserve(t, st, key, tok, fp, longLease)
	s.wantPending(t, "Reserve after a claim with a binary fingerprint", reserve(t, st, key, newToken(), nil, longLease), owner, fp)
	s.wantPending(t, "Lookup after a claim with a binary fingerprint", lookup(t, st, key), owner, fp)
	wantOK(t, "Complete with every byte value", complete(t, st, key, tok, all, longRetention))
	wantCompleted(t, "Lookup of a record with every byte value", lookup(t, st, key), all)
	wantCompleted(t, "Reserve of a record with every byte value", reserve(t, st, key, newToken(), nil, longLease), all)
}

func testDataReturnedSlices(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok, fp := newKey("returned-slices"), newToken(), newFingerprint()
	owner := reserve(t, st, key, tok, bytes.Clone(fp), longLease)
	e := reserve(t, st, key, newToken(), nil, longLease)
	s.wantPending(t, "Reserve by another token", e, owner, fp)
	scribble(e.Fingerprint)
	e = lookup(t, st, key)
	s.wantPending(t, "Lookup after scribbling on the Fingerprint Reserve returned", e, owner, fp)
	scribble(e.Fingerprint)
	s.wantPending(t, "Reserve after scribbling on the Fingerprint Lookup returned", reserve(t, st, key, newToken(), nil, longLease), owner, fp)

	rec := randomBytes(256)
	wantOK(t, "Complete", complete(t, st, key, tok, bytes.Clone(rec), longRetention))
	e = reserve(t, st, key, newToken(), nil, longLease)
	wantCompleted(t, "Reserve after Complete", e, rec)
	scribble(e.Record)
	e = lookup(t, st, key)
	wantCompleted(t, "Lookup after scribbling on the Record Reserve returned", e, rec)
	scribble(e.Record)
	wantCompleted(t, "Reserve after scribbling on the Record Lookup returned", reserve(t, st, key, newToken(), nil, longLease), rec)
}

func scribble(b []byte) {
	for i := range b {
		b[i] ^= 0xa5
	}
}

func testCloseErrClosed(t *testing.T, s *suite) {
	st := s.open(t)
	key := newKey("close")
	tok, seen := pendingEntry(t, st, st, key, longLease)
	wantOK(t, "Close", st.Close())

	ctx := t.Context()
	wantClosed := func(method string, err error) {
		t.Helper()
		if !errors.Is(err, idempotency.ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", method, err)
		}
	}
	_, err := st.Reserve(ownerCtx(ctx, key, tok), key, idempotency.Claim{Token: newToken(), Lease: longLease})
	wantClosed("Reserve", err)
	_, err = st.Lookup(ctx, key)
	wantClosed("Lookup", err)
	wantClosed("Renew", renew(t, st, key, tok, longLease))
	wantClosed("Complete", complete(t, st, key, tok, []byte("late"), longRetention))
	wantClosed("Release", release(t, st, key, tok))
	wctx, cancel := context.WithTimeout(ctx, s.patience())
	defer cancel()
	r := wantReturn(t, "Wait after Close", startWait(wctx, st, key, seen), s.patience()+s.patience())
	wantClosed("Wait", r.err)
	if err := st.Close(); err != nil && !errors.Is(err, idempotency.ErrClosed) {
		t.Errorf("second Close: %v, want nil or ErrClosed", err)
	}
}

// testDataEmptyKey: the empty store key (the interceptors never make it,
// but a Store takes any string) is either refused by Reserve, holding
// nothing, or held like any other: a Reserve that acquires it must be
// followed by a Complete that stores, never by a key stuck pending.
func testDataEmptyKey(t *testing.T, s *suite) {
	st := s.open(t)
	tok := newToken()
	e, err := st.Reserve(ownerCtx(t.Context(), "", tok), "", idempotency.Claim{Token: tok, Lease: longLease})
	if err != nil {
		if e, lerr := st.Lookup(t.Context(), ""); lerr == nil && e.State == idempotency.Pending && e.Token == tok {
			t.Fatalf("Reserve of the empty key failed (%v), yet it is left pending under the claim", err)
		}
		return
	}
	switch e.State {
	case idempotency.Acquired:
	case idempotency.Completed:
		// Left by an earlier run on a shared backend: take it over.
		in, ok := st.(idempotency.Inspector)
		if !ok {
			t.Skip("the empty key holds a record of an earlier run, and the store cannot forget it")
		}
		_, err := in.ForgetKey(t.Context(), "", false)
		wantOK(t, "ForgetKey of the empty key", err)
		wantAcquired(t, "Reserve of the empty key", reserve(t, st, "", tok, nil, longLease), tok)
	default:
		t.Skipf("the empty key is %s, held by another run on a shared backend", describe(e))
	}
	rec := randomBytes(20)
	wantOK(t, "Complete of the empty key", complete(t, st, "", tok, rec, longRetention))
	wantCompleted(t, "Lookup of the empty key", lookup(t, st, ""), rec)
	if in, ok := st.(idempotency.Inspector); ok {
		_, err := in.ForgetKey(t.Context(), "", false)
		wantOK(t, "ForgetKey of the empty key", err)
	}
}

// testDataEmptyToken: a claim without a token names no owner (Release and
// Complete could not tell it from any other caller without one), so Reserve
// and Renew refuse it, as every store of this module does, and hold nothing.
func testDataEmptyToken(t *testing.T, s *suite) {
	st := s.open(t)
	key := newKey("empty-token")
	e, err := st.Reserve(t.Context(), key, idempotency.Claim{Lease: longLease})
	if err == nil {
		t.Fatalf("Reserve with an empty token: %s, want an error", describe(e))
	}
	wantState(t, "Lookup after Reserve with an empty token", lookup(t, st, key), idempotency.Absent)
	if err := st.Renew(t.Context(), key, idempotency.Claim{Lease: longLease}); err == nil {
		t.Fatal("Renew of an absent key with an empty token: nil, want an error")
	}
	wantState(t, "Lookup after Renew with an empty token", lookup(t, st, key), idempotency.Absent)
}
