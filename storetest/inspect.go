package storetest

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
)

// UnorderedListing declares that the store's idempotency.Inspector lists
// keys in an order of its own (Redis: SCAN order) rather than by store key:
// Run then checks that each page is sorted and that every key is listed, but
// allows keys to come in any order across pages, and to come again.
func UnorderedListing() Option {
	return func(c *config) { c.unordered = true }
}

// inspector returns st as an Inspector, or skips the test.
func inspector(t *testing.T, st idempotency.Store) idempotency.Inspector {
	t.Helper()
	in, ok := st.(idempotency.Inspector)
	if !ok {
		t.Skipf("%T does not implement idempotency.Inspector (optional)", st)
	}
	return in
}

// listAll pages through the listing of prefix, limit keys a page, and
// returns the keys in the order listed; it checks each page on the way.
func (s *suite) listAll(t *testing.T, in idempotency.Inspector, prefix string, limit int) []idempotency.ListedKey {
	t.Helper()
	var all []idempotency.ListedKey
	token := ""
	for pages := 0; ; pages++ {
		if pages > 1000 {
			t.Fatalf("ListKeys(%s): still a next page after 1000 pages of %d", quote(prefix), limit)
		}
		keys, next, err := in.ListKeys(t.Context(), prefix, token, limit)
		if err != nil {
			t.Fatalf("ListKeys(%s, page %d): %v", quote(prefix), pages+1, err)
		}
		if len(keys) > limit {
			t.Fatalf("ListKeys(%s, limit %d): %d keys", quote(prefix), limit, len(keys))
		}
		for i, k := range keys {
			if !strings.HasPrefix(k.Key, prefix) {
				t.Fatalf("ListKeys(%s) listed %s, which does not start with the prefix", quote(prefix), quote(k.Key))
			}
			if i > 0 && keys[i-1].Key >= k.Key {
				t.Fatalf("ListKeys(%s): page %d is not in ascending key order: %s before %s", quote(prefix), pages+1, quote(keys[i-1].Key), quote(k.Key))
			}
		}
		all = append(all, keys...)
		if next == "" {
			return all
		}
		token = next
	}
}

// testInspectList: a listing holds every pending and completed key under
// its prefix and nothing else, in pages of at most the limit, in key order
// (or each page sorted, for an unordered store), keys and records binary
// safe, and glob characters in the prefix taken literally.
func testInspectList(t *testing.T, s *suite) {
	st := s.open(t)
	in := inspector(t, st)
	prefix := newKey(`list*?[a-z]\`)
	suffixes := []string{"", "\x00", "\x00a", "\x00b", "\xff", "\xff\xfe", "a", "a*", "a?", "[b]", `\`, "{c}", "%2F", "\xc3\x28", "z"}
	want := map[string]idempotency.Entry{}
	records := map[string][]byte{}
	for i, suffix := range suffixes {
		key := prefix + suffix
		tok := newToken()
		e := reserve(t, st, key, tok, nil, longLease)
		wantAcquired(t, "Reserve", e, tok)
		if i%5 == 1 {
			want[key] = idempotency.Entry{State: idempotency.Pending, Token: tok}
			continue
		}
		rec := append(randomBytes(16), suffix...)
		wantOK(t, "Complete", complete(t, st, key, tok, rec, longRetention))
		want[key] = idempotency.Entry{State: idempotency.Completed}
		records[key] = rec
	}
	// Keys a careless prefix match would take: the prefix's glob
	// characters as globs, a shorter key, a sibling.
	outside := []string{
		strings.Replace(prefix, "*", "x", 1) + "a",
		strings.Replace(prefix, "[a-z]", "b", 1) + "a",
		prefix[:len(prefix)-1],
		prefix[:len(prefix)-1] + "/",
	}
	for _, key := range outside {
		tok := newToken()
		reserve(t, st, key, tok, nil, longLease)
		wantOK(t, "Complete", complete(t, st, key, tok, []byte("outside"), longRetention))
	}
	// A released key is absent, and not listed.
	released := prefix + "released"
	tok := newToken()
	reserve(t, st, released, tok, nil, longLease)
	wantOK(t, "Release", release(t, st, released, tok))

	for _, limit := range []int{1, 3, len(suffixes) + 10} {
		all := s.listAll(t, in, prefix, limit)
		seen := map[string]bool{}
		for i, k := range all {
			if !s.unordered && i > 0 && all[i-1].Key >= k.Key {
				t.Fatalf("ListKeys(limit %d): %s listed after %s: not in ascending store-key order across pages", limit, quote(k.Key), quote(all[i-1].Key))
			}
			w, ok := want[k.Key]
			if !ok {
				t.Fatalf("ListKeys(limit %d) listed %s, which was not made under the prefix (or was released)", limit, quote(k.Key))
			}
			seen[k.Key] = true
			switch w.State {
			case idempotency.Pending:
				wantPendingUnder(t, "listed pending key "+quote(k.Key), k.Entry, w.Token)
				if k.Entry.LeaseExpires.IsZero() {
					t.Fatalf("listed pending key %s: LeaseExpires is not set", quote(k.Key))
				}
			case idempotency.Completed:
				wantCompleted(t, "listed key "+quote(k.Key), k.Entry, records[k.Key])
				if k.Entry.Expires.IsZero() {
					t.Fatalf("listed key %s: Expires is not set", quote(k.Key))
				}
			}
		}
		for key := range want {
			if !seen[key] {
				t.Fatalf("ListKeys(limit %d) never listed %s", limit, quote(key))
			}
		}
	}

	// The exact key as the prefix lists it (and the keys it is a prefix of).
	// A page may be short (a store that scans, such as Redis's, in a large
	// keyspace), so the listing is paged through.
	keys := s.listAll(t, in, prefix+"a*", 10)
	if len(keys) != 1 || keys[0].Key != prefix+"a*" {
		t.Fatalf("ListKeys(%s) = %d keys, want that one key", quote(prefix+"a*"), len(keys))
	}

	if _, _, err := in.ListKeys(t.Context(), prefix, "not a page token", 10); !errors.Is(err, idempotency.ErrBadPageToken) {
		t.Fatalf("ListKeys with a page token the store did not make: %v, want ErrBadPageToken", err)
	}
}

// testInspectForgetPending: a running key is not forgotten without force;
// with force its lease ends, its waiters wake, the next Reserve acquires it,
// and the old owner is fenced out.
func testInspectForgetPending(t *testing.T, s *suite) {
	st := s.open(t)
	in := inspector(t, st)
	key := newKey("forget-pending")
	owner := newToken()
	fp := newFingerprint()
	acquired := reserve(t, st, key, owner, fp, longLease)

	_, err := in.ForgetKey(t.Context(), key, false)
	if !errors.Is(err, idempotency.ErrInProgress) {
		t.Fatalf("ForgetKey(pending, no force): %v, want ErrInProgress", err)
	}
	s.wantPending(t, "Lookup after a refused ForgetKey", lookup(t, st, key), acquired, fp)

	waited := make(chan error, 1)
	go func() { waited <- st.Wait(t.Context(), key, acquired) }()
	s.pause()

	e, err := in.ForgetKey(t.Context(), key, true)
	wantOK(t, "ForgetKey(pending, force)", err)
	wantPendingUnder(t, "ForgetKey(pending, force) returns what the key held", e, owner)
	wantState(t, "Lookup after a forced ForgetKey", lookup(t, st, key), idempotency.Absent)
	select {
	case err := <-waited:
		wantOK(t, "Wait on a forgotten key", err)
	case <-time.After(s.patience()):
		t.Fatalf("Wait still blocked %v after its key was forgotten", s.patience())
	}

	next := newToken()
	wantAcquired(t, "Reserve after a forced ForgetKey", reserve(t, st, key, next, nil, longLease), next)
	wantNotOwner(t, "the old owner's Complete", complete(t, st, key, owner, []byte("stale"), longRetention))
}

// testInspectForgetCompleted: forgetting a record makes the next Reserve
// acquire; an absent key is reported as such and nothing changes.
func testInspectForgetCompleted(t *testing.T, s *suite) {
	st := s.open(t)
	in := inspector(t, st)
	key := newKey("forget-completed")
	owner := newToken()
	reserve(t, st, key, owner, nil, longLease)
	rec := randomBytes(100)
	wantOK(t, "Complete", complete(t, st, key, owner, rec, longRetention))

	e, err := in.ForgetKey(t.Context(), key, false)
	wantOK(t, "ForgetKey(completed)", err)
	wantCompleted(t, "ForgetKey(completed) returns what the key held", e, rec)
	wantState(t, "Lookup after ForgetKey", lookup(t, st, key), idempotency.Absent)

	e, err = in.ForgetKey(t.Context(), key, false)
	wantOK(t, "ForgetKey(absent)", err)
	wantState(t, "ForgetKey(absent)", e, idempotency.Absent)

	next := newToken()
	wantAcquired(t, "Reserve after ForgetKey", reserve(t, st, key, next, nil, longLease), next)
	rec2 := randomBytes(10)
	wantOK(t, "Complete after ForgetKey", complete(t, st, key, next, rec2, longRetention))
	wantCompleted(t, "Lookup", lookup(t, st, key), rec2)
}

// testInspectSummary: the counts a store knows include what the test made.
func testInspectSummary(t *testing.T, s *suite) {
	st := s.open(t)
	in := inspector(t, st)
	var size int64
	for i := range 2 {
		key := newKey("summary")
		tok := newToken()
		reserve(t, st, key, tok, nil, longLease)
		rec := randomBytes(1000 + i)
		size += int64(len(rec))
		wantOK(t, "Complete", complete(t, st, key, tok, rec, longRetention))
	}
	reserve(t, st, newKey("summary-pending"), newToken(), nil, longLease)

	sum, err := in.Summary(t.Context())
	wantOK(t, "Summary", err)
	if sum.Store == "" {
		t.Fatal("Summary: Store is empty; it names the kind of store")
	}
	for _, f := range []struct {
		name      string
		got, want int64
	}{{"Records", sum.Records, 2}, {"Pending", sum.Pending, 1}, {"Bytes", sum.Bytes, size}} {
		if f.got < -1 {
			t.Fatalf("Summary: %s = %d; a figure is at least 0, or -1 when unknown", f.name, f.got)
		}
		if f.got >= 0 && f.got < f.want {
			t.Fatalf("Summary: %s = %d, want at least %d: what this test made", f.name, f.got, f.want)
		}
	}
}
