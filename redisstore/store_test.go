package redisstore_test

import (
	"bytes"
	"context"
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// eventually is the bound for conditions that must come true on a loaded
// machine; nothing in these tests expects to need more than a fraction of it.
const eventually = 20 * time.Second

func claim(token string) idempotency.Claim {
	return idempotency.Claim{Token: token, Fingerprint: []byte("fp-" + token), Lease: time.Minute}
}

func TestNewRejectsBadInput(t *testing.T) {
	_, err := redisstore.New(nil)
	require.ErrorContains(t, err, "nil")

	c := redis.NewClient(&redis.Options{Addr: redisAddr()})
	defer c.Close()
	for _, p := range []string{"a{b", "a}b", "{x}:"} {
		_, err = redisstore.New(c, redisstore.WithPrefix(p))
		require.ErrorContains(t, err, "hash tag", "prefix %q", p)
	}
}

func TestReserveCompleteReplay(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	s := newStore(t, c, testPrefix(t, c))

	start := time.Now()
	e, err := s.Reserve(ctx, "k", claim("t1"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Acquired, e.State)
	assert.Equal(t, "t1", e.Token)
	assert.WithinRange(t, e.LeaseExpires, start.Add(time.Minute-time.Second), time.Now().Add(time.Minute))

	// A second caller sees the owner, its fingerprint and its lease.
	e, err = s.Reserve(ctx, "k", claim("t2"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)
	assert.Equal(t, "t1", e.Token)
	assert.Equal(t, []byte("fp-t1"), e.Fingerprint)
	assert.WithinRange(t, e.LeaseExpires, start.Add(time.Minute-5*time.Second), time.Now().Add(time.Minute+time.Second))

	l, err := s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, l.State)
	assert.Equal(t, "t1", l.Token)

	require.NoError(t, s.Complete(ctx, "k", "t1", []byte("record"), time.Hour))

	for _, tok := range []string{"t2", "t1"} {
		e, err = s.Reserve(ctx, "k", claim(tok))
		require.NoError(t, err)
		assert.Equal(t, idempotency.Completed, e.State)
		assert.Equal(t, []byte("record"), e.Record)
		assert.WithinRange(t, e.Expires, start.Add(time.Hour-5*time.Second), time.Now().Add(time.Hour+time.Second))
	}
	l, err = s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Completed, l.State)
	assert.Equal(t, []byte("record"), l.Record)

	// Returned slices belong to the caller.
	e.Record[0] = 'X'
	l, err = s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, []byte("record"), l.Record)

	l, err = s.Lookup(ctx, "never")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Entry{State: idempotency.Absent}, l)
}

func TestNilFingerprint(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	s := newStore(t, c, testPrefix(t, c))
	_, err := s.Reserve(ctx, "k", idempotency.Claim{Token: "t1", Lease: time.Minute})
	require.NoError(t, err)
	e, err := s.Reserve(ctx, "k", claim("t2"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)
	assert.Nil(t, e.Fingerprint)
}

func TestReleaseAndOwnerChecks(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	s := newStore(t, c, prefix)

	_, err := s.Reserve(ctx, "k", claim("owner"))
	require.NoError(t, err)

	// Nobody but the owner changes a pending key; a token that is a prefix
	// or an extension of the owner's is somebody else.
	for _, tok := range []string{"other", "own", "owner2", "", "5:owner"} {
		assert.ErrorIs(t, s.Release(ctx, "k", tok), idempotency.ErrNotOwner, tok)
		assert.ErrorIs(t, s.Complete(ctx, "k", tok, []byte("x"), time.Hour), idempotency.ErrNotOwner, tok)
		if tok != "" {
			assert.ErrorIs(t, s.Renew(ctx, "k", idempotency.Claim{Token: tok, Lease: time.Minute}), idempotency.ErrNotOwner, tok)
		}
	}
	// Renew may write a claim, so it refuses an empty token as Reserve does.
	assert.ErrorContains(t, s.Renew(ctx, "k", idempotency.Claim{Lease: time.Minute}), "Token")
	e, err := s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)
	assert.Equal(t, "owner", e.Token)

	require.NoError(t, s.Release(ctx, "k", "owner"))
	e, err = s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Absent, e.State)
	assert.Empty(t, redisKeys(t, c, prefix))

	// Released: the owner has nothing left to release. A Renew takes the
	// key back (its owner still runs), and then it is the owner's to
	// release again.
	assert.ErrorIs(t, s.Release(ctx, "k", "owner"), idempotency.ErrNotOwner)
	require.NoError(t, s.Renew(ctx, "k", idempotency.Claim{Token: "owner", Lease: time.Minute}))
	e, err = s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)
	assert.Equal(t, "owner", e.Token)
	require.NoError(t, s.Release(ctx, "k", "owner"))

	// A new owner takes the key; the old one can no longer touch it.
	e, err = s.Reserve(ctx, "k", claim("new"))
	require.NoError(t, err)
	require.Equal(t, idempotency.Acquired, e.State)
	assert.ErrorIs(t, s.Complete(ctx, "k", "owner", []byte("stale"), time.Hour), idempotency.ErrNotOwner)
	require.NoError(t, s.Complete(ctx, "k", "new", []byte("fresh"), time.Hour))

	// Completed: nobody releases, renews or overwrites it.
	for _, tok := range []string{"owner", "new", "other"} {
		assert.ErrorIs(t, s.Release(ctx, "k", tok), idempotency.ErrNotOwner, tok)
		assert.ErrorIs(t, s.Renew(ctx, "k", idempotency.Claim{Token: tok, Lease: time.Minute}), idempotency.ErrNotOwner, tok)
	}
	assert.ErrorIs(t, s.Complete(ctx, "k", "other", []byte("other"), time.Hour), idempotency.ErrNotOwner)
	assert.ErrorIs(t, s.Complete(ctx, "k", "new", []byte("changed"), time.Hour), idempotency.ErrNotOwner)
	e, err = s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, []byte("fresh"), e.Record)
}

// A command that go-redis retries after a lost answer runs its script twice;
// the owner must not be locked out of its own key by that.
func TestRetriedCommandsAreHarmless(t *testing.T) { forEachMode(t, testRetriedCommandsAreHarmless) }

func testRetriedCommandsAreHarmless(t *testing.T, m storeMode) {
	ctx := context.Background()
	c := newClient(t)
	s := m.store(t, c, testPrefix(t, c))

	e, err := s.Reserve(ctx, "k", claim("t1"))
	require.NoError(t, err)
	require.Equal(t, idempotency.Acquired, e.State)
	e, err = s.Reserve(ctx, "k", claim("t1"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Acquired, e.State)
	assert.Equal(t, "t1", e.Token)
	assert.WithinDuration(t, time.Now().Add(time.Minute), e.LeaseExpires, 5*time.Second)

	require.NoError(t, s.Complete(ctx, "k", "t1", []byte("rec"), time.Hour))
	require.NoError(t, s.Complete(ctx, "k", "t1", []byte("rec"), time.Hour))
	assert.ErrorIs(t, s.Complete(ctx, "k", "t1", []byte("rec2"), time.Hour), idempotency.ErrNotOwner)
	assert.ErrorIs(t, s.Complete(ctx, "k", "t1", []byte("re"), time.Hour), idempotency.ErrNotOwner)
	e, err = s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, []byte("rec"), e.Record)
}

func TestRenewExtendsLease(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	s := newStore(t, c, prefix)

	_, err := s.Reserve(ctx, "k", idempotency.Claim{Token: "t", Lease: 2 * time.Second})
	require.NoError(t, err)
	keys := redisKeys(t, c, prefix)
	require.Len(t, keys, 1)
	ttl := c.PTTL(ctx, keys[0]).Val()
	assert.LessOrEqual(t, ttl, 2*time.Second)

	require.NoError(t, s.Renew(ctx, "k", idempotency.Claim{Token: "t", Lease: time.Hour}))
	ttl = c.PTTL(ctx, keys[0]).Val()
	assert.Greater(t, ttl, 59*time.Minute)
	e, err := s.Reserve(ctx, "k", claim("u"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)
	assert.WithinDuration(t, time.Now().Add(time.Hour), e.LeaseExpires, 5*time.Second)
}

func TestLeaseRunsOut(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	s := newStore(t, c, testPrefix(t, c))

	_, err := s.Reserve(ctx, "k", idempotency.Claim{Token: "dead", Lease: 150 * time.Millisecond})
	require.NoError(t, err)
	seen, err := s.Reserve(ctx, "k", claim("next"))
	require.NoError(t, err)
	require.Equal(t, idempotency.Pending, seen.State)

	// The owner never finishes: Wait returns when its lease runs out, on
	// the Redis clock, and the next Reserve takes the key over.
	wctx, cancel := context.WithTimeout(ctx, eventually)
	defer cancel()
	require.NoError(t, s.Wait(wctx, "k", seen))
	e, err := s.Reserve(ctx, "k", claim("next"))
	require.NoError(t, err)
	require.Equal(t, idempotency.Acquired, e.State)

	// The dead owner comes back: it cannot renew, release or complete
	// over the new owner.
	assert.ErrorIs(t, s.Renew(ctx, "k", idempotency.Claim{Token: "dead", Lease: time.Minute}), idempotency.ErrNotOwner)
	assert.ErrorIs(t, s.Release(ctx, "k", "dead"), idempotency.ErrNotOwner)
	assert.ErrorIs(t, s.Complete(ctx, "k", "dead", []byte("stale"), time.Hour), idempotency.ErrNotOwner)
	require.NoError(t, s.Complete(ctx, "k", "next", []byte("fresh"), time.Hour))
	e, err = s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, []byte("fresh"), e.Record)
}

// An owner whose lease ran out, with nobody taking the key over, still
// stores its outcome: it is real, and worth replaying.
func TestCompleteAfterLeaseRanOut(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	s := newStore(t, c, prefix)

	_, err := s.Reserve(ctx, "k", idempotency.Claim{Token: "slow", Lease: 50 * time.Millisecond})
	require.NoError(t, err)
	waitAbsent(t, s, "k")
	require.NoError(t, s.Complete(ctx, "k", "slow", []byte("late"), time.Hour))
	e, err := s.Reserve(ctx, "k", claim("other"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Completed, e.State)
	assert.Equal(t, []byte("late"), e.Record)
}

// An owner whose lease ran out in Redis (its process was paused, or cut off
// from Redis, for longer than the lease) while nobody took the key takes it
// back with its next Renew, fingerprint and fresh lease included, so that a
// duplicate waits for it instead of running again. A waiter on the lapsed
// lease is woken by the owner's Complete. A key another owner took, or that
// is completed, is not taken back.
func TestRenewTakesBackLapsedLease(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	s := newStore(t, c, prefix, noRecheck)
	other := newStore(t, newClient(t), prefix, noRecheck)

	fp := []byte("fp\x00of the paused call")
	paused := idempotency.Claim{Token: "paused", Fingerprint: fp, Lease: 50 * time.Millisecond}
	_, err := s.Reserve(ctx, "k", paused)
	require.NoError(t, err)
	seen, err := other.Reserve(ctx, "k", claim("dup"))
	require.NoError(t, err)
	require.Equal(t, idempotency.Pending, seen.State)
	waitAbsent(t, s, "k")

	paused.Lease = time.Minute
	require.NoError(t, s.Renew(ctx, "k", paused))
	e, err := other.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)
	assert.Equal(t, "paused", e.Token)
	assert.Equal(t, fp, e.Fingerprint)
	assert.WithinDuration(t, time.Now().Add(time.Minute), e.LeaseExpires, 5*time.Second)
	rk := redisstore.RedisKey(s, "k")
	assert.Greater(t, c.PTTL(ctx, rk).Val(), 50*time.Second)
	e, err = other.Reserve(ctx, "k", claim("dup"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State, "a duplicate took the key the paused owner took back")
	assert.Equal(t, "paused", e.Token)

	// A Renew that go-redis retries runs twice: the second extends.
	require.NoError(t, s.Renew(ctx, "k", paused))

	// A duplicate that saw the old lease wakes at its end; the key is
	// pending again, so it waits anew, and the owner's Complete wakes it.
	require.NoError(t, waitResult(t, goWait(ctx, other, "k", seen)))
	seen, err = other.Reserve(ctx, "k", claim("dup"))
	require.NoError(t, err)
	require.Equal(t, idempotency.Pending, seen.State)
	waited := goWait(ctx, other, "k", seen)
	waitForWaiter(t, c, other, "k")
	require.NoError(t, s.Complete(ctx, "k", "paused", []byte("outcome"), time.Hour))
	require.NoError(t, waitResult(t, waited))
	e, err = other.Reserve(ctx, "k", claim("dup"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Completed, e.State)
	assert.Equal(t, []byte("outcome"), e.Record)
	// Completed: no Renew takes it back, the owner's included.
	assert.ErrorIs(t, s.Renew(ctx, "k", paused), idempotency.ErrNotOwner)

	// Another owner took the lapsed key: Renew is refused and changes
	// nothing, neither the owner nor its lease.
	late := idempotency.Claim{Token: "late", Fingerprint: fp, Lease: 50 * time.Millisecond}
	_, err = s.Reserve(ctx, "k2", late)
	require.NoError(t, err)
	waitAbsent(t, s, "k2")
	e, err = other.Reserve(ctx, "k2", idempotency.Claim{Token: "taker", Fingerprint: fp, Lease: 30 * time.Second})
	require.NoError(t, err)
	require.Equal(t, idempotency.Acquired, e.State)
	late.Lease = time.Hour
	assert.ErrorIs(t, s.Renew(ctx, "k2", late), idempotency.ErrNotOwner)
	e, err = s.Lookup(ctx, "k2")
	require.NoError(t, err)
	assert.Equal(t, "taker", e.Token)
	assert.LessOrEqual(t, c.PTTL(ctx, redisstore.RedisKey(s, "k2")).Val(), 30*time.Second)
	assert.ErrorIs(t, s.Complete(ctx, "k2", "late", []byte("stale"), time.Hour), idempotency.ErrNotOwner)
}

// waitAbsent waits for key to expire in Redis. Expiry has no notification
// to wait for, so this polls, gently and within a generous bound.
func waitAbsent(t *testing.T, s *redisstore.Store, key string) {
	t.Helper()
	deadline := time.Now().Add(eventually)
	for {
		e, err := s.Lookup(context.Background(), key)
		require.NoError(t, err)
		if e.State == idempotency.Absent {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("key %q still %v after %v", key, e.State, eventually)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestRecordExpires(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	s := newStore(t, c, prefix)

	_, err := s.Reserve(ctx, "k", claim("t"))
	require.NoError(t, err)
	require.NoError(t, s.Complete(ctx, "k", "t", []byte("r"), 100*time.Millisecond))
	keys := redisKeys(t, c, prefix)
	require.Len(t, keys, 1)
	ttl := c.PTTL(ctx, keys[0]).Val()
	assert.Greater(t, ttl, time.Duration(0))
	assert.LessOrEqual(t, ttl, 100*time.Millisecond)

	waitAbsent(t, s, "k")
	e, err := s.Reserve(ctx, "k", claim("u"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Acquired, e.State)
}

func TestBadArguments(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	s := newStore(t, c, testPrefix(t, c))

	_, err := s.Reserve(ctx, "k", idempotency.Claim{Token: "t"})
	assert.ErrorContains(t, err, "Claim.Lease of 0s is out of range")
	_, err = s.Reserve(ctx, "k", idempotency.Claim{Token: "t", Lease: -time.Second})
	assert.ErrorContains(t, err, "Claim.Lease of -1s is out of range")
	_, err = s.Reserve(ctx, "k", idempotency.Claim{Lease: time.Second})
	assert.ErrorContains(t, err, "Token")
	_, err = s.Reserve(ctx, "k", claim("t"))
	require.NoError(t, err)
	assert.ErrorContains(t, s.Complete(ctx, "k", "t", nil, 0), "retention of 0s is out of range")
	assert.ErrorContains(t, s.Renew(ctx, "k", idempotency.Claim{Token: "t", Lease: 0}), "Claim.Lease of 0s is out of range")

	// Sub-millisecond durations round up rather than reach Redis as 0.
	_, err = s.Reserve(ctx, "k2", idempotency.Claim{Token: "t", Lease: time.Microsecond})
	require.NoError(t, err)
	assert.NoError(t, s.Complete(ctx, "k", "t", []byte("r"), time.Microsecond))
}

// The longest lease and retention a Store must hold, idempotency.MaxRetention,
// reach Redis intact: the record (or lease) lives, and expires when it should.
// Anything longer, zero or negative, is refused with the store's own error
// before Redis is asked, and leaves the key as it was; near the largest
// time.Duration, rounding up to milliseconds would otherwise overflow.
func TestDurationBounds(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	s := newStore(t, c, prefix)
	const limit = idempotency.MaxRetention
	pttl := func(key string) time.Duration {
		t.Helper()
		d, err := c.PTTL(ctx, redisstore.RedisKey(s, key)).Result()
		require.NoError(t, err)
		return d
	}
	nearMax := func(key string) {
		t.Helper()
		d := pttl(key)
		assert.Greater(t, d, limit-clockTolerance, key)
		assert.LessOrEqual(t, d, limit, key)
	}

	start := time.Now()
	e, err := s.Reserve(ctx, "long-lease", idempotency.Claim{Token: "t", Lease: limit})
	require.NoError(t, err)
	require.Equal(t, idempotency.Acquired, e.State)
	nearMax("long-lease")
	e, err = s.Lookup(ctx, "long-lease")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)
	assert.WithinDuration(t, start.Add(limit), e.LeaseExpires, clockTolerance)
	require.NoError(t, s.Renew(ctx, "long-lease", idempotency.Claim{Token: "t", Lease: limit}))
	nearMax("long-lease")

	_, err = s.Reserve(ctx, "long-record", claim("t"))
	require.NoError(t, err)
	start = time.Now()
	require.NoError(t, s.Complete(ctx, "long-record", "t", []byte("kept for ten years"), limit))
	nearMax("long-record")
	e, err = s.Reserve(ctx, "long-record", claim("u"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Completed, e.State)
	assert.Equal(t, []byte("kept for ten years"), e.Record)
	assert.WithinDuration(t, start.Add(limit), e.Expires, clockTolerance)

	_, err = s.Reserve(ctx, "held", claim("owner"))
	require.NoError(t, err)
	heldTTL := pttl("held")
	for _, d := range []time.Duration{0, -time.Nanosecond, math.MinInt64, math.MaxInt64, math.MaxInt64 - 1, limit + time.Millisecond, limit + time.Nanosecond} {
		refused := func(op string, err error) {
			t.Helper()
			require.Error(t, err, "%s with %d", op, d)
			assert.ErrorContains(t, err, "is out of range", "%s with %d", op, d)
			assert.ErrorContains(t, err, "redisstore: ", "%s with %d", op, d)
			var rerr redis.Error
			assert.False(t, errors.As(err, &rerr), "%s with %d: Redis was asked: %v", op, d, err)
		}
		_, err := s.Reserve(ctx, "refused", idempotency.Claim{Token: "t", Lease: d})
		refused("Reserve", err)
		refused("Renew", s.Renew(ctx, "held", idempotency.Claim{Token: "owner", Lease: d}))
		refused("Renew of an absent key", s.Renew(ctx, "refused", idempotency.Claim{Token: "t", Lease: d}))
		refused("Complete", s.Complete(ctx, "held", "owner", []byte("r"), d))
	}
	e, err = s.Lookup(ctx, "refused")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Absent, e.State)
	e, err = s.Lookup(ctx, "held")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)
	assert.Equal(t, "owner", e.Token)
	assert.LessOrEqual(t, pttl("held"), heldTTL)
}

// Store keys up to idempotency.MaxStoreKeyLength are held; longer ones are
// refused by Reserve, Renew and Complete with an error wrapping
// ErrKeyTooLong, and nothing is written.
func TestStoreKeyBounds(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	s := newStore(t, c, prefix)

	longest := strings.Repeat("k", idempotency.MaxStoreKeyLength)
	_, err := s.Reserve(ctx, longest, claim("t"))
	require.NoError(t, err)
	require.NoError(t, s.Renew(ctx, longest, claim("t")))
	require.NoError(t, s.Complete(ctx, longest, "t", []byte("r"), time.Hour))
	e, err := s.Lookup(ctx, longest)
	require.NoError(t, err)
	assert.Equal(t, idempotency.Completed, e.State)

	tooLong := longest + "k"
	_, err = s.Reserve(ctx, tooLong, claim("t"))
	assert.ErrorIs(t, err, idempotency.ErrKeyTooLong)
	assert.ErrorIs(t, s.Renew(ctx, tooLong, claim("t")), idempotency.ErrKeyTooLong)
	assert.ErrorIs(t, s.Complete(ctx, tooLong, "t", []byte("r"), time.Hour), idempotency.ErrKeyTooLong)
	assert.Len(t, redisKeys(t, c, prefix), 1, "a refused key was written")
}

// A key that something else wrote under the store's prefix gives an error,
// not a panic or a wrong answer.
func TestForeignValues(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	s := newStore(t, c, prefix)

	_, err := s.Reserve(ctx, "k", claim("t"))
	require.NoError(t, err)
	rk := redisKeys(t, c, prefix)[0]
	for _, v := range []string{"garbage", "P", "P-", "P-9:ab", "P-x:ab", "C", "C:", "C-1:"} {
		require.NoError(t, c.Set(ctx, rk, v, time.Minute).Err())
		_, err = s.Lookup(ctx, "k")
		assert.Error(t, err, "value %q", v)
		_, err = s.Reserve(ctx, "k", claim("u"))
		assert.Error(t, err, "value %q", v)
	}
	require.NoError(t, c.Set(ctx, rk, "P-1:tfp", 0).Err()) // no expiry
	_, err = s.Lookup(ctx, "k")
	assert.ErrorContains(t, err, "no expiry")

	require.NoError(t, c.Del(ctx, rk).Err())
	require.NoError(t, c.HSet(ctx, rk, "a", "b").Err())
	_, err = s.Reserve(ctx, "k", claim("u"))
	assert.ErrorContains(t, err, "WRONGTYPE")
}

func TestBinarySafe(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	s := newStore(t, c, prefix)

	all := make([]byte, 256)
	for i := range all {
		all[i] = byte(i)
	}
	big := bytes.Repeat([]byte("0123456789abcdef\x00\xff"), 8<<20/18)
	keys := []string{"", "a", "a\x00", "a\x00b", "{a}", "}{", "{", "}", "x/y", string(all), "1:a", "P-1:a",
		strings.Repeat("k", idempotency.MaxStoreKeyLength)}
	tokens := []string{"t", "\x00", "1:1", ":", string(all), "12345678901234567890"}
	for i, key := range keys {
		tok := tokens[i%len(tokens)]
		fp := append([]byte{byte(i)}, all...)
		e, err := s.Reserve(ctx, key, idempotency.Claim{Token: tok, Fingerprint: fp, Lease: time.Minute})
		require.NoError(t, err)
		require.Equal(t, idempotency.Acquired, e.State, "key %q", key)
		e, err = s.Reserve(ctx, key, claim("other"))
		require.NoError(t, err)
		require.Equal(t, idempotency.Pending, e.State, "key %q", key)
		assert.Equal(t, tok, e.Token)
		assert.Equal(t, fp, e.Fingerprint)
		rec := append([]byte(key), all...)
		if i == 0 {
			rec = big
		}
		require.NoError(t, s.Complete(ctx, key, tok, rec, time.Hour))
	}
	// Every key kept its own record: no two keys share a Redis key.
	for i, key := range keys {
		e, err := s.Reserve(ctx, key, claim("other"))
		require.NoError(t, err)
		require.Equal(t, idempotency.Completed, e.State, "key %q", key)
		want := append([]byte(key), all...)
		if i == 0 {
			want = big
		}
		require.True(t, bytes.Equal(want, e.Record), "key %q record differs", key)
	}
	assert.Len(t, redisKeys(t, c, prefix), len(keys))
	// The hash tag comes from the store, never from the caller's braces.
	for _, rk := range redisKeys(t, c, prefix) {
		rest := strings.TrimPrefix(rk, prefix)
		require.True(t, len(rest) >= 10 && rest[0] == '{' && rest[9] == '}', "redis key %q", rk)
	}
}

func TestClose(t *testing.T) { forEachMode(t, testClose) }

func testClose(t *testing.T, m storeMode) {
	ctx := context.Background()
	c := newClient(t)
	s := m.store(t, c, testPrefix(t, c))

	_, err := s.Reserve(ctx, "k", claim("t1"))
	require.NoError(t, err)
	seen, err := s.Reserve(ctx, "k", claim("t2"))
	require.NoError(t, err)
	waited := make(chan error, 1)
	go func() { waited <- s.Wait(ctx, "k", seen) }()
	waitForWaiter(t, c, s, "k")

	require.NoError(t, s.Close())
	select {
	case err := <-waited:
		assert.ErrorIs(t, err, idempotency.ErrClosed)
	case <-time.After(eventually):
		t.Fatal("Close did not end a Wait")
	}
	require.NoError(t, s.Close())

	_, err = s.Reserve(ctx, "k", claim("t3"))
	assert.ErrorIs(t, err, idempotency.ErrClosed)
	_, err = s.Lookup(ctx, "k")
	assert.ErrorIs(t, err, idempotency.ErrClosed)
	assert.ErrorIs(t, s.Renew(ctx, "k", idempotency.Claim{Token: "t1", Lease: time.Minute}), idempotency.ErrClosed)
	assert.ErrorIs(t, s.Complete(ctx, "k", "t1", nil, time.Hour), idempotency.ErrClosed)
	assert.ErrorIs(t, s.Release(ctx, "k", "t1"), idempotency.ErrClosed)
	assert.ErrorIs(t, s.Wait(ctx, "k", seen), idempotency.ErrClosed)

	// The caller's client is still the caller's.
	require.NoError(t, c.Ping(ctx).Err())
}

// waitForWaiter blocks until a Wait on key has subscribed and marked the key
// as waited on, which is when a Complete is sure to reach it.
func waitForWaiter(t *testing.T, c redis.UniversalClient, s *redisstore.Store, key string) {
	t.Helper()
	rk := redisstore.RedisKey(s, key)
	deadline := time.Now().Add(eventually)
	for {
		v, err := c.GetRange(context.Background(), rk, 0, 1).Result()
		require.NoError(t, err)
		if v == "PW" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no waiter registered on %q after %v (value head %q)", key, eventually, v)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
