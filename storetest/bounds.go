package storetest

import (
	"context"
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
)

// testReleaseAfterLeaseRanOut: an owner whose lease ran out, with nobody
// having taken the key over, no longer holds it: the key is absent, as if
// never reserved, and Release of an absent key is refused with ErrNotOwner
// in every store (its Renew or Complete take the key back instead, see
// Renew/TakesBackAbsent and Complete/AfterLeaseRanOut).
func testReleaseAfterLeaseRanOut(t *testing.T, s *suite) {
	st := s.open(t)
	key, tok := newKey("release-after-lease"), newToken()
	wantAcquired(t, "Reserve under a short lease", reserve(t, st, key, tok, newFingerprint(), s.shortLease()), tok)
	// A second key, reserved after the first under the same lease, tells
	// when the first has run out, without looking at the first: a look
	// could have the store drop the expired lease, hiding a Release that
	// does not check the lease's end itself.
	clock, clockTok := newKey("release-after-lease-clock"), newToken()
	owner := reserve(t, st, clock, clockTok, nil, s.shortLease())
	wantAcquired(t, "Reserve of the clock key under a short lease", owner, clockTok)
	s.waitLeaseOut(t, st, clock, owner)
	wantNotOwner(t, "Release by the owner after its lease ran out, nobody having taken over", release(t, st, key, tok))
	wantState(t, "Lookup after the late Release", lookup(t, st, key), idempotency.Absent)
	tok2 := newToken()
	wantAcquired(t, "Reserve after the late Release", reserve(t, st, key, tok2, nil, longLease), tok2)
}

// testBoundsDurations: a lease or retention of idempotency.MaxRetention is
// kept for that long (no overflow, no instant expiry, in whatever unit the
// store keeps time), and one outside (0, MaxRetention] is refused with an
// error, writing nothing.
func testBoundsDurations(t *testing.T, s *suite) {
	st := s.open(t)
	const maxD = idempotency.MaxRetention

	key, tok, fp := newKey("bounds-max"), newToken(), newFingerprint()
	before := time.Now()
	owner := reserve(t, st, key, tok, fp, maxD)
	wantAcquired(t, "Reserve with a lease of MaxRetention", owner, tok)
	s.wantTime(t, "LeaseExpires of a lease of MaxRetention", owner.LeaseExpires, before.Add(maxD), time.Now().Add(maxD))
	e := lookup(t, st, key)
	wantPendingUnder(t, "Lookup of a lease of MaxRetention", e, tok)
	s.wantTime(t, "Lookup's LeaseExpires of a lease of MaxRetention", e.LeaseExpires, before.Add(maxD), time.Now().Add(maxD))
	before = time.Now()
	wantOK(t, "Renew with a lease of MaxRetention", renew(t, st, key, tok, maxD))
	e = lookup(t, st, key)
	wantPendingUnder(t, "Lookup after Renew with a lease of MaxRetention", e, tok)
	s.wantTime(t, "LeaseExpires after Renew with a lease of MaxRetention", e.LeaseExpires, before.Add(maxD), time.Now().Add(maxD))
	rec := randomBytes(32)
	before = time.Now()
	wantOK(t, "Complete with a retention of MaxRetention", complete(t, st, key, tok, rec, maxD))
	e = lookup(t, st, key)
	wantCompleted(t, "Lookup of a record kept for MaxRetention", e, rec)
	s.wantTime(t, "Expires of a record kept for MaxRetention", e.Expires, before.Add(maxD), time.Now().Add(maxD))

	// The shortest duration a store must take, a nanosecond, acquires (and
	// may be gone at once); the next Reserve must not find it stuck.
	key, tok = newKey("bounds-min"), newToken()
	wantAcquired(t, "Reserve with a lease of 1ns", reserve(t, st, key, tok, nil, time.Nanosecond), tok)
	eventually(t, "Lookup after a lease of 1ns", time.Now().Add(s.lateness()), func() (bool, string) {
		e := lookup(t, st, key)
		return e.State == idempotency.Absent, describe(e)
	})

	bad := []time.Duration{0, -1, -time.Hour, math.MinInt64, maxD + 1, maxD + time.Millisecond, math.MaxInt64}
	for _, d := range bad {
		key, tok := newKey("bounds-bad"), newToken()
		_, err := st.Reserve(ownerCtx(t.Context(), key, tok), key, idempotency.Claim{Token: tok, Lease: d})
		if err == nil || errors.Is(err, idempotency.ErrClosed) {
			t.Fatalf("Reserve with a lease of %v: %v, want an error refusing the lease", d, err)
		}
		wantState(t, "Lookup after Reserve with a lease of "+d.String(), lookup(t, st, key), idempotency.Absent)
		if err := renew(t, st, key, tok, d); err == nil || errors.Is(err, idempotency.ErrNotOwner) {
			t.Fatalf("Renew of an absent key with a lease of %v: %v, want an error refusing the lease", d, err)
		}
		wantState(t, "Lookup after Renew with a lease of "+d.String(), lookup(t, st, key), idempotency.Absent)

		wantAcquired(t, "Reserve", reserve(t, st, key, tok, nil, longLease), tok)
		if err := renew(t, st, key, tok, d); err == nil || errors.Is(err, idempotency.ErrNotOwner) {
			t.Fatalf("Renew by the owner with a lease of %v: %v, want an error refusing the lease", d, err)
		}
		if err := complete(t, st, key, tok, []byte("bad retention"), d); err == nil || errors.Is(err, idempotency.ErrNotOwner) {
			t.Fatalf("Complete with a retention of %v: %v, want an error refusing the retention", d, err)
		}
		wantPendingUnder(t, "Lookup after Complete with a retention of "+d.String(), lookup(t, st, key), tok)
		wantOK(t, "Release", release(t, st, key, tok))
	}
}

// testBoundsKeyTooLong: a store key one byte over
// idempotency.MaxStoreKeyLength is refused by every changing method with an
// error that wraps idempotency.ErrKeyTooLong, and nothing is written.
func testBoundsKeyTooLong(t *testing.T, s *suite) {
	st := s.open(t)
	prefix := newKey("too-long")
	key := prefix + strings.Repeat("x", idempotency.MaxStoreKeyLength+1-len(prefix))
	tok := newToken()
	wantTooLong := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, idempotency.ErrKeyTooLong) {
			t.Fatalf("%s of a %d-byte key: %v, want ErrKeyTooLong", what, len(key), err)
		}
	}
	absent := func(what string) {
		t.Helper()
		e, err := st.Lookup(t.Context(), key)
		if err == nil && e.State != idempotency.Absent {
			t.Fatalf("Lookup of the %d-byte key after %s: got %s, want absent (or an error)", len(key), what, describe(e))
		}
	}
	_, err := st.Reserve(ownerCtx(t.Context(), key, tok), key, idempotency.Claim{Token: tok, Lease: longLease})
	wantTooLong("Reserve", err)
	absent("Reserve")
	wantTooLong("Renew", renew(t, st, key, tok, longLease))
	absent("Renew")
	wantTooLong("Complete", complete(t, st, key, tok, []byte("x"), longRetention))
	absent("Complete")
}

// testInspectExpiredIsAbsent: a lease that ran out and a record whose
// retention ran out are neither listed nor reported by ForgetKey.
func testInspectExpiredIsAbsent(t *testing.T, s *suite) {
	st := s.open(t)
	in := inspector(t, st)
	prefix := newKey("inspect-expired")
	leased, done := prefix+"/leased", prefix+"/done"
	owner := reserve(t, st, leased, newToken(), nil, s.shortLease())
	tok := newToken()
	reserve(t, st, done, tok, nil, longLease)
	before := time.Now()
	wantOK(t, "Complete under a short retention", complete(t, st, done, tok, []byte("short"), s.shortRetention()))
	s.waitLeaseOut(t, st, leased, owner)
	sleepUntil(before.Add(s.shortRetention()))
	eventually(t, "Lookup after the retention", before.Add(s.shortRetention()+s.lateness()), func() (bool, string) {
		e := lookup(t, st, done)
		return e.State == idempotency.Absent, describe(e)
	})
	if keys := s.listAll(t, in, prefix, 10); len(keys) != 0 {
		t.Fatalf("ListKeys after the lease and the retention ran out: %s is listed, as %s", quote(keys[0].Key), describe(keys[0].Entry))
	}
	for _, key := range []string{leased, done} {
		e, err := in.ForgetKey(context.WithoutCancel(t.Context()), key, false)
		wantOK(t, "ForgetKey of an expired key "+quote(key), err)
		wantState(t, "ForgetKey of an expired key "+quote(key), e, idempotency.Absent)
	}
}

// testInspectListBinaryPrefix: a prefix that holds or ends in a NUL or 0xFF
// byte lists exactly the keys that start with it: no C string cut at the
// NUL, no range end that wraps past 0xFF.
func testInspectListBinaryPrefix(t *testing.T, s *suite) {
	st := s.open(t)
	in := inspector(t, st)
	base := newKey("list-binary-prefix")
	suffixes := []string{"", "\x00", "\x00a", "\x00\x00", "\x00\xff", "\x01", "a", "\xfe", "\xff", "\xff\x00", "\xff\xff", "\xff\xff\xff"}
	for _, suffix := range suffixes {
		key, tok := base+suffix, newToken()
		reserve(t, st, key, tok, nil, longLease)
		wantOK(t, "Complete of "+quote(key), complete(t, st, key, tok, []byte(suffix), longRetention))
	}
	for _, p := range []string{"\x00", "\x00\x00", "\x00\xff", "\xff", "\xff\xff", "\xff\xff\xff", "\xfe"} {
		prefix := base + p
		var want []string
		for _, suffix := range suffixes {
			if strings.HasPrefix(suffix, p) {
				want = append(want, base+suffix)
			}
		}
		for _, limit := range []int{1, 10} {
			got := s.listAll(t, in, prefix, limit)
			seen := map[string]bool{}
			for _, k := range got {
				seen[k.Key] = true
			}
			for _, key := range want {
				if !seen[key] {
					t.Fatalf("ListKeys(%s, limit %d) never listed %s", quote(prefix), limit, quote(key))
				}
			}
			if len(seen) != len(want) {
				t.Fatalf("ListKeys(%s, limit %d) listed %d distinct keys, want %d", quote(prefix), limit, len(seen), len(want))
			}
		}
	}
}

// testInspectPageTokenOtherPrefix: whatever page token ListKeys is given,
// even one of another prefix's listing, it lists only keys that start with
// the prefix it is given (or refuses the token with ErrBadPageToken). A
// token is the caller's to hand back, and an admin's listing of one scope
// must not show another scope's keys.
func testInspectPageTokenOtherPrefix(t *testing.T, s *suite) {
	st := s.open(t)
	in := inspector(t, st)
	base := newKey("token-other-prefix")
	a, b := base+"/a/", base+"/b/"
	for i := range 20 {
		for _, p := range []string{a, b} {
			key, tok := p+string(rune('a'+i)), newToken()
			reserve(t, st, key, tok, nil, longLease)
			wantOK(t, "Complete of "+quote(key), complete(t, st, key, tok, []byte(key), longRetention))
		}
	}
	token := ""
	for pages := 0; pages < 100; pages++ {
		_, next, err := in.ListKeys(t.Context(), a, token, 1)
		wantOK(t, "ListKeys of "+quote(a), err)
		if next == "" {
			return
		}
		token = next
		keys, _, err := in.ListKeys(t.Context(), b, token, 100)
		if errors.Is(err, idempotency.ErrBadPageToken) {
			continue
		}
		wantOK(t, "ListKeys of "+quote(b)+" with a page token of "+quote(a), err)
		for _, k := range keys {
			if !strings.HasPrefix(k.Key, b) {
				t.Fatalf("ListKeys(%s) with a page token of the listing of %s listed %s, which does not start with the prefix", quote(b), quote(a), quote(k.Key))
			}
		}
	}
	t.Fatalf("ListKeys(%s, limit 1): still a next page after 100 pages, for 20 keys", quote(a))
}
