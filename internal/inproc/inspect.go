package inproc

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/grpcidem/idempotency"
)

// What the stores that keep their leases here share to implement
// idempotency.Inspector. Their listings are in store-key order, so a page
// token is the last key of the page: "k" and the key.

// PageToken returns the token of the page after keys, a page that was asked
// for limit keys: none when it came back short.
func PageToken(keys []idempotency.ListedKey, limit int) string {
	if len(keys) < limit || len(keys) == 0 {
		return ""
	}
	return "k" + keys[len(keys)-1].Key
}

// ParsePageToken returns the key after which a listing goes on.
func ParsePageToken(token string) (after string, err error) {
	if token == "" {
		return "", nil
	}
	if !strings.HasPrefix(token, "k") {
		return "", fmt.Errorf("%w: %q was not made by this store", idempotency.ErrBadPageToken, token)
	}
	return token[1:], nil
}

// CheckList refuses a limit below one.
func CheckList(limit int) error {
	if limit < 1 {
		return fmt.Errorf("idempotency: ListKeys needs a limit of at least 1, got %d", limit)
	}
	return nil
}

// Follows reports whether key belongs on a page of the listing of prefix
// after after.
func Follows(key, prefix, after string) bool {
	return strings.HasPrefix(key, prefix) && key > after
}

// ListPending appends to keys the live leases whose keys follow after and
// start with prefix; the shard's lock must be held.
func (s *Shard[T]) ListPending(keys []idempotency.ListedKey, prefix, after string, now time.Time) []idempotency.ListedKey {
	for k := range s.Leases {
		if !Follows(k, prefix, after) {
			continue
		}
		if l := s.Live(k, now); l != nil {
			keys = append(keys, idempotency.ListedKey{Key: k, Entry: l.pending()})
		}
	}
	return keys
}

// ListPending returns the first limit live leases, in key order, whose keys
// start with prefix and follow after.
func (t *Table[T]) ListPending(prefix, after string, limit int, now time.Time) []idempotency.ListedKey {
	var keys []idempotency.ListedKey
	for i := range t.Shards {
		sh := &t.Shards[i]
		sh.Mu.Lock()
		keys = sh.ListPending(keys, prefix, after, now)
		sh.Mu.Unlock()
	}
	return SortListed(keys, limit)
}

// SortListed sorts keys by key, keeps the first of equal keys (a pending
// one, put first, over a record being written), and cuts it to limit.
func SortListed(keys []idempotency.ListedKey, limit int) []idempotency.ListedKey {
	slices.SortStableFunc(keys, func(a, b idempotency.ListedKey) int { return cmp.Compare(a.Key, b.Key) })
	keys = slices.CompactFunc(keys, func(a, b idempotency.ListedKey) bool { return a.Key == b.Key })
	if len(keys) > limit {
		clear(keys[limit:])
		keys = keys[:limit]
	}
	return keys
}

// ListRecords appends to keys the live records whose keys follow after and
// start with prefix; the shard's lock must be held.
func (r *Records) ListRecords(keys []idempotency.ListedKey, prefix, after string, now time.Time) []idempotency.ListedKey {
	for k, rec := range r.M {
		if Follows(k, prefix, after) && now.Before(rec.Expires) {
			keys = append(keys, idempotency.ListedKey{Key: k, Entry: rec.Entry()})
		}
	}
	return keys
}

// Forget is ForgetKey for the stores that keep their leases here: a live
// lease is refused (idempotency.ErrInProgress) unless force is set, and then
// ended, its waiters woken; otherwise drop deletes the key's record, under
// the shard's lock, and reports the Entry it held.
func (t *Table[T]) Forget(key string, force bool, drop func(sh *Shard[T]) (idempotency.Entry, error)) (idempotency.Entry, error) {
	sh := t.Shard(key)
	sh.Mu.Lock()
	defer sh.Mu.Unlock()
	if l := sh.Live(key, time.Now()); l != nil {
		e := l.pending()
		if !force {
			return e, fmt.Errorf("%w: its owner holds the key under a lease until %s", idempotency.ErrInProgress, e.LeaseExpires.UTC().Format(time.RFC3339Nano))
		}
		sh.End(key, l)
		return e, nil
	}
	return drop(sh)
}

// CountPending returns how many keys are pending.
func (t *Table[T]) CountPending() int64 {
	now := time.Now()
	var n int64
	for i := range t.Shards {
		sh := &t.Shards[i]
		sh.Mu.Lock()
		for k := range sh.Leases {
			if sh.Live(k, now) != nil {
				n++
			}
		}
		sh.Mu.Unlock()
	}
	return n
}
