package idempotency

import (
	"context"
	"errors"
)

// An Inspector is a Store that an operator can look into: list its keys,
// forget one, and count what it holds. The admin service (NewAdminServer)
// needs it; the interceptors never use it. It is optional: a Store that does
// not implement it works as well, only without the admin service. Every
// store in this module and its companions implements it (boltstore,
// memstore, redisstore, pgstore), and the conformance suite in package
// storetest checks it when a Store does.
//
// Reading one key needs no method here: it is Store.Lookup.
type Inspector interface {
	Store

	// ListKeys returns up to limit (at least 1) keys whose store key
	// starts with prefix, each with its Entry (State Pending or Completed:
	// absent and expired keys are never listed), and the token of the next
	// page: pass it as pageToken, with the same prefix, to go on; it is ""
	// when the listing is done. pageToken is "" for the first page. A page
	// may hold fewer than limit keys (none, even) and still have a next one.
	//
	// Keys come in ascending byte order of store key, each once, unless the
	// store documents otherwise (Redis lists in its SCAN order: each page is
	// sorted, and a key may come again on a later page). Every key that
	// exists for the whole listing is listed at least once; a key made or
	// deleted meanwhile may or may not be. A page token that the store did
	// not make is refused with an error that wraps ErrBadPageToken.
	ListKeys(ctx context.Context, prefix, pageToken string, limit int) (keys []ListedKey, next string, err error)

	// ForgetKey makes key absent, so that the next Reserve acquires it, and
	// returns the Entry it held (State Absent if it held nothing, and then
	// changes nothing). A pending key is refused with an error that wraps
	// ErrInProgress, and left as it is, unless force is set: then its lease
	// ends as if released, its waiters are woken, and the next Reserve
	// acquires it while the old owner may still be running; the old owner's
	// Renew or Complete then takes the key back (or stores its record) if
	// nobody took it meanwhile, as after a lease that ran out.
	ForgetKey(ctx context.Context, key string, force bool) (Entry, error)

	// Summary reports what the store holds, as far as it can tell without
	// reading every record.
	Summary(ctx context.Context) (StoreSummary, error)
}

// A ListedKey is one key of a listing.
type ListedKey struct {
	// Key is the store key (see StoreKey and SplitStoreKey).
	Key string
	// Entry is its state, as Lookup would report it: Pending or Completed.
	Entry Entry
}

// StoreSummary is what an Inspector reports about its store. A figure it
// cannot tell cheaply is -1.
type StoreSummary struct {
	// Store names the kind of store: "bbolt", "memory", "redis",
	// "postgres".
	Store string
	// Records counts the completed records; Pending counts the keys whose
	// first execution is running.
	Records, Pending int64
	// Bytes is what the records take in the store, as the store measures
	// it (documented by each store).
	Bytes int64
	// Approximate says that Records, Pending or Bytes are estimates, or
	// count expired records not yet swept.
	Approximate bool
	// Extra holds figures particular to the store, by name (snake_case).
	Extra map[string]int64
}

// Errors returned by Inspectors.
var (
	// ErrInProgress is returned (wrapped) by ForgetKey for a key whose
	// first execution is still running, when force is not set.
	ErrInProgress = errors.New("idempotency: the key's first execution is still running")
	// ErrBadPageToken is returned (wrapped) by ListKeys for a page token
	// that the store did not make.
	ErrBadPageToken = errors.New("idempotency: bad page token")
)
