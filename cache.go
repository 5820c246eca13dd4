package idempotency

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// A Store keeps the Records of executed calls, and the leases of the calls
// still running, under store keys. The interceptors derive a store key from
// the caller's scope and idempotency key (see StoreKey); a Store treats keys as
// opaque, binary-safe strings.
//
// Every method is safe for concurrent use, and every method that changes a key
// is atomic with respect to the others on the same key: that is what makes one
// execution per key possible across goroutines, processes and replicas. The
// conformance suite in package storetest checks these rules; run it against
// any Store of your own.
//
// A key is in one of three states. Absent: never reserved, released, or its
// record or lease has expired. Pending: reserved by an owner whose lease has
// not run out. Completed: a record is stored and has not expired.
type Store interface {
	// Reserve claims key for a new execution, or reports what holds it, in
	// one atomic step.
	//
	// If key is absent, or pending under a lease that has run out, Reserve
	// makes it pending under claim.Token for claim.Lease and returns an Entry
	// with State Acquired. If key is pending under a live lease, it returns
	// State Pending with that owner's Token, Fingerprint and LeaseExpires. If
	// key is completed, it returns State Completed with the Record, so that a
	// replay costs one call.
	Reserve(ctx context.Context, key string, claim Claim) (Entry, error)

	// Renew extends the lease of key to claim.Lease from now, if it is
	// pending under claim.Token. If key is absent (the owner's lease ran
	// out and nobody took the key over, or it was released), Renew takes it
	// back under claim, as Reserve would: the owner is still running, and
	// its work is still the only work on the key. It returns ErrNotOwner,
	// and changes nothing, if another owner holds key or it is completed.
	Renew(ctx context.Context, key string, claim Claim) error

	// Complete stores record under key for retention and wakes its waiters,
	// if key is pending under token, or absent (the owner's lease ran out
	// and nobody took the key over: its outcome is still real and worth
	// keeping). It returns ErrNotOwner and stores nothing if another owner
	// holds key or has completed it: a stale owner never overwrites a newer
	// one. The store may keep record after Complete returns; the caller
	// must not modify it.
	Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error

	// Release makes a pending key absent again and wakes its waiters, if it
	// is held by token; otherwise it does nothing and returns ErrNotOwner.
	Release(ctx context.Context, key, token string) error

	// Lookup reports the state of key without changing it. An absent key is
	// State Absent with a nil error.
	Lookup(ctx context.Context, key string) (Entry, error)

	// Wait blocks until key may have left the state seen: seen is an Entry
	// with State Pending that an earlier Reserve or Lookup returned. Wait
	// returns nil as soon as the key is no longer pending under seen.Token
	// (completed, released or taken over), or when the lease seen has run
	// out (at seen.LeaseExpires, or later if the owner renewed it meanwhile:
	// a store may wait out renewals); the caller then calls Reserve again. It returns ctx.Err() when
	// ctx ends first. Wait must not miss a change that happened after seen
	// was read, and must not poll in a tight loop: stores that can be
	// notified (in-process channels, Redis pub/sub, PostgreSQL LISTEN) are.
	Wait(ctx context.Context, key string, seen Entry) error

	// Every method that changes a key is called with a context that carries
	// the Execution of the call that owns it (see ExecutionFromContext), so
	// that a Store can finish inside Complete or Release work that the
	// handler began, such as a database transaction holding the handler's own
	// writes. Complete and Release get that context without its cancellation:
	// a caller that hangs up mid-handler must not lose the record.

	// Close releases the store's resources and stops its background work.
	// Calls made after Close return ErrClosed.
	Close() error
}

// A Claim is what Reserve writes into an absent key.
type Claim struct {
	// Token identifies the owner; the interceptors use 128 random bits.
	Token string
	// Fingerprint is the request fingerprint, when it is known before the
	// handler runs (unary and server-streaming calls), so that a duplicate
	// with another request is refused at once. It may be nil.
	Fingerprint []byte
	// Lease is how long the key stays pending without a Renew: more than
	// zero and at most MaxRetention (stores refuse other values).
	Lease time.Duration
	// Held says that the owner runs in this process and ends its lease
	// itself, with Complete or Release, on every path (the interceptors
	// set it). A store that keeps its leases in this process's memory
	// (the memory and bbolt stores) then never lets such a lease run out
	// by the clock: its owner lives exactly as long as the process, and a
	// process that was paused (SIGSTOP, a frozen VM, a debugger) for longer
	// than the lease still has its handler running when it resumes. Such a
	// lease ends with Complete or Release, or when the process exits; if
	// Complete fails, the store holds the key for one more Lease by the
	// clock, so duplicates wait instead of running again at once. Stores
	// shared between processes cannot tell a paused owner from a dead one
	// and ignore Held.
	Held bool
}

// State is the state of a store key, as Reserve and Lookup report it.
type State uint8

const (
	// Absent: the key holds nothing (Lookup only).
	Absent State = iota
	// Acquired: Reserve made the key pending under the caller's token.
	Acquired
	// Pending: another owner holds the key under a live lease.
	Pending
	// Completed: a record is stored under the key.
	Completed
)

func (s State) String() string {
	switch s {
	case Absent:
		return "absent"
	case Acquired:
		return "acquired"
	case Pending:
		return "pending"
	case Completed:
		return "completed"
	}
	return "State(" + strconv.Itoa(int(s)) + ")"
}

// An Entry is the state of a store key. Returned slices belong to the caller.
type Entry struct {
	State State
	// Token is the owner's token (Acquired and Pending).
	Token string
	// Fingerprint is the owner's Claim.Fingerprint (Pending; may be nil).
	Fingerprint []byte
	// LeaseExpires is when the owner's lease runs out (Acquired and Pending).
	LeaseExpires time.Time
	// Record is the stored record, a marshalled idempotency.v1.Record
	// (Completed).
	Record []byte
	// Expires is when the record stops being replayed (Completed).
	Expires time.Time
}

// Errors returned by Stores.
var (
	// ErrNotOwner is returned by Renew, Complete and Release when the key is
	// not held by the given token.
	ErrNotOwner = errors.New("idempotency: key is not held by this owner")
	// ErrRolledBack is returned (wrapped) by Complete when the record could
	// not be stored and the handler's own writes, made in the same
	// transaction (see pgstore), were rolled back with it: the call had no
	// effect. The interceptors then answer Aborted instead of the handler's
	// outcome, so that the caller retries.
	ErrRolledBack = errors.New("idempotency: record not stored; the handler's transaction was rolled back")
	// ErrClosed is returned by a Store's methods after Close.
	ErrClosed = errors.New("idempotency: store is closed")
	// ErrLeaseLost is the cause (context.Cause) with which the context of a
	// running handler is cancelled when another owner took its key over
	// after its lease ran out (a long pause of a replica on a shared
	// store): the other owner runs, or has run, the same call, so the
	// handler should stop before its side effect. Execution.Err reports it
	// too.
	ErrLeaseLost = errors.New("idempotency: the lease on the key was lost to another owner")
	// ErrKeyTooLong is returned (wrapped) by a Store for a store key longer
	// than MaxStoreKeyLength.
	ErrKeyTooLong = errors.New("idempotency: store key too long")
)

// Bounds of what every Store holds. The interceptors refuse a call whose
// store key would be longer before its handler runs (InvalidArgument), so a
// Store can rely on them; the stores in this module and its companions
// check them too.
const (
	// MaxScopeLength is the longest scope, in bytes, that WithScope may
	// return for a call with a key.
	MaxScopeLength = 256
	// MaxStoreKeyLength is the longest store key a Store must hold: a scope
	// of MaxScopeLength bytes, each escaped to three, a separator and a key
	// of MaxKeyLength bytes.
	MaxStoreKeyLength = 3*MaxScopeLength + 1 + MaxKeyLength
)

// CheckStoreKey returns an error wrapping ErrKeyTooLong for a store key that
// is longer than MaxStoreKeyLength, for Stores to refuse it.
func CheckStoreKey(key string) error {
	if len(key) > MaxStoreKeyLength {
		return fmt.Errorf("%w: %d bytes, the limit is %d", ErrKeyTooLong, len(key), MaxStoreKeyLength)
	}
	return nil
}

// CheckDuration returns an error for a lease or retention (named what) that a
// Store must refuse: zero or less, or more than MaxRetention, which every
// store converts without overflow.
func CheckDuration(what string, d time.Duration) error {
	if d <= 0 || d > MaxRetention {
		return fmt.Errorf("idempotency: %s of %v is out of range: it must be more than 0 and at most %v", what, d, MaxRetention)
	}
	return nil
}

// StoreKey returns the store key for an idempotency key within a scope. The
// scope comes first and is escaped, so that no two (scope, key) pairs share a
// store key, and keys stay printable for operators who look at a store.
func StoreKey(scope, key string) string {
	return escapeScope(scope) + "/" + key
}

// SplitStoreKey is the inverse of StoreKey. ok is false for a string that
// StoreKey did not make.
func SplitStoreKey(storeKey string) (scope, key string, ok bool) {
	escaped, key, found := strings.Cut(storeKey, "/")
	if !found {
		return "", "", false
	}
	scope, err := url.PathUnescape(escaped)
	if err != nil || escapeScope(scope) != escaped {
		return "", "", false
	}
	return scope, key, true
}

// escapeScope percent-encodes the bytes of scope that are not unreserved
// characters, so that the result holds no "/" and splitting a store key at
// its first "/" gives the scope back.
func escapeScope(scope string) string {
	clean := true
	for i := 0; i < len(scope); i++ {
		if !unreserved(scope[i]) {
			clean = false
			break
		}
	}
	if clean {
		return scope
	}
	const hex = "0123456789ABCDEF"
	b := make([]byte, 0, len(scope)*3)
	for i := 0; i < len(scope); i++ {
		c := scope[i]
		if unreserved(c) {
			b = append(b, c)
			continue
		}
		b = append(b, '%', hex[c>>4], hex[c&15])
	}
	return string(b)
}

func unreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		c == '-' || c == '_' || c == '.' || c == '~' || c == ':' || c == '@'
}
