// Package redisstore is an idempotency.Store in Redis, for services that run
// several replicas: a retry that lands on another replica finds the record,
// or the lease, that the first replica wrote.
//
// Every operation is one Lua script on one Redis key, so it is atomic and
// costs one round trip: a replay is one Reserve, a first execution is a
// Reserve and a Complete, plus a Renew per lease period for a long handler.
// Leases and retention are Redis expirations (PX), so they run on the
// Redis server's clock, and replicas whose clocks disagree still agree on
// who holds a key.
//
// Waiters are woken through pub/sub: each Store keeps one subscriber
// connection, shared by all its waiters, and subscribes it to the channels of
// the keys it waits on. A notification is sent only for keys that have a
// waiter. Pub/sub delivers at most once, so a waiter also re-checks its key
// now and then (WithRecheckInterval), and after the subscriber reconnects.
//
// See README.md for what the store guarantees across failover and eviction.
package redisstore

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/redis/go-redis/v9"
)

// DefaultPrefix is the prefix of every Redis key and channel a Store uses,
// unless WithPrefix says otherwise.
const DefaultPrefix = "idem:"

// DefaultRecheckInterval is how often a waiter re-checks its key by itself,
// in case a notification was lost.
const DefaultRecheckInterval = time.Second

// Store is an idempotency.Store in Redis. It is safe for concurrent use.
// Several Store values, in one process or in many, may share one Redis (and
// one prefix): that is how replicas share their records.
type Store struct {
	client  redis.UniversalClient
	prefix  string
	recheck time.Duration
	hub     *hub
	acks    *replicaAcks // nil unless WithReplicaAcks
	pipe    *pipeliner   // nil unless WithAutoPipelining
	closed  atomic.Bool
}

var _ idempotency.Store = (*Store)(nil)

// An Option configures a Store.
type Option func(*options)

type options struct {
	prefix      string
	recheck     time.Duration
	healthCheck time.Duration
	acks        int
	acksTimeout time.Duration
	autoPipe    bool
}

// WithPrefix sets the prefix of the Store's Redis keys and pub/sub channels
// (DefaultPrefix when not given). Stores that share records must use the
// same prefix; distinct prefixes keep services apart on one Redis. The prefix
// may be empty, and must not contain '{' or '}': the Store places its own
// hash tag right after it.
func WithPrefix(prefix string) Option {
	return func(o *options) { o.prefix = prefix }
}

// WithRecheckInterval sets how often a waiter re-checks its key when no
// notification came (DefaultRecheckInterval when d is zero or less). It
// bounds how late a waiter learns of a change whose notification was lost.
func WithRecheckInterval(d time.Duration) Option {
	return func(o *options) { o.recheck = d }
}

// WithHealthCheckInterval sets how long the subscriber connection may stay
// silent before the Store pings it, and then how long it waits for the
// answer before it reconnects (30 seconds when d is zero or less).
func WithHealthCheckInterval(d time.Duration) Option {
	return func(o *options) { o.healthCheck = d }
}

// New returns a Store that keeps its keys in the Redis that client serves: a
// *redis.Client, a *redis.ClusterClient, or a sentinel failover client.
//
// The Store uses client and never closes it: the caller closes it, after the
// Store. The Store opens one more connection of its own, for pub/sub, in the
// background, and closes it in Close. New does not wait for Redis: a Redis
// that is down surfaces as errors from the Store's methods, and the
// subscriber connects once it is back. With WithAutoPipelining the Store
// sends its scripts through the client's AutoPipeliner, and closes that in
// Close (see WithAutoPipelining).
func New(client redis.UniversalClient, opts ...Option) (*Store, error) {
	if client == nil {
		return nil, errors.New("redisstore: New needs a Redis client, got nil")
	}
	o := options{prefix: DefaultPrefix, recheck: DefaultRecheckInterval, healthCheck: 30 * time.Second}
	for _, opt := range opts {
		opt(&o)
	}
	if strings.ContainsAny(o.prefix, "{}") {
		return nil, fmt.Errorf("redisstore: prefix %q contains '{' or '}'; the store adds its own cluster hash tag after the prefix", o.prefix)
	}
	if o.recheck <= 0 {
		o.recheck = DefaultRecheckInterval
	}
	if o.healthCheck <= 0 {
		o.healthCheck = 30 * time.Second
	}
	s := &Store{client: client, prefix: o.prefix, recheck: o.recheck}
	if o.autoPipe {
		if o.acks != 0 || o.acksTimeout != 0 {
			return nil, errors.New("redisstore: WithAutoPipelining cannot be combined with WithReplicaAcks: a WAIT must follow its write on the same connection, and the writes it covers (Reserve, Renew, Complete) are the ones the pipeliner would batch")
		}
		p, err := newPipeliner(client)
		if err != nil {
			return nil, err
		}
		s.pipe = p
	} else if o.acks != 0 || o.acksTimeout != 0 {
		a, err := newReplicaAcks(client, o.acks, o.acksTimeout)
		if err != nil {
			return nil, err
		}
		s.acks = a
	}
	s.hub = newHub(client, o.healthCheck)
	return s, nil
}

// run runs script on key rk: through the auto-pipeliner with
// WithAutoPipelining, on the client otherwise.
func (s *Store) run(ctx context.Context, script *redis.Script, rk string, args ...any) *redis.Cmd {
	if s.pipe != nil {
		return s.pipe.run(ctx, script, rk, args...)
	}
	return script.Run(ctx, s.client, []string{rk}, args...)
}

// redisKey returns the Redis key of a store key, which is also the name of
// the pub/sub channel its waiters listen on: the prefix, a hash tag of the
// key's hash, and the key itself. The hash tag picks the cluster slot, so
// that braces in a caller's key cannot choose it; the key itself keeps keys
// distinct without trusting a hash, and readable to an operator.
func (s *Store) redisKey(key string) string {
	h := fnv.New32a()
	h.Write([]byte(key))
	var b strings.Builder
	b.Grow(len(s.prefix) + 10 + len(key))
	b.WriteString(s.prefix)
	b.WriteByte('{')
	var sum [8]byte
	hex := strconv.AppendUint(sum[:0], uint64(h.Sum32()), 16)
	for range 8 - len(hex) {
		b.WriteByte('0')
	}
	b.Write(hex)
	b.WriteByte('}')
	b.WriteString(key)
	return b.String()
}

// owner encodes a token so that it can be compared as a prefix.
func owner(token string) string {
	return strconv.Itoa(len(token)) + ":" + token
}

// pendingValue is the value of a key pending under owner field ow, with no
// waiter flag yet.
func pendingValue(ow string, fingerprint []byte) []byte {
	v := make([]byte, 0, 2+len(ow)+len(fingerprint))
	v = append(v, 'P', '-')
	v = append(v, ow...)
	return append(v, fingerprint...)
}

// millis converts a lease or retention to whole milliseconds for PX, rounding
// up so that a positive duration never becomes zero. It refuses what
// idempotency.CheckDuration refuses (zero or less, more than
// idempotency.MaxRetention), before anything reaches Redis: rounding up a
// duration near the largest time.Duration would overflow to a negative
// number, which Redis refuses with an error that names neither the value nor
// the option it came from.
func millis(what string, d time.Duration) (int64, error) {
	if err := idempotency.CheckDuration(what, d); err != nil {
		return 0, fmt.Errorf("redisstore: %w", err)
	}
	return int64((d + time.Millisecond - 1) / time.Millisecond), nil
}

// checkKey refuses a store key longer than idempotency.MaxStoreKeyLength,
// with an error that wraps idempotency.ErrKeyTooLong.
func checkKey(key string) error {
	if err := idempotency.CheckStoreKey(key); err != nil {
		return fmt.Errorf("redisstore: %w", err)
	}
	return nil
}

// Reserve implements idempotency.Store in one round trip.
//
// LeaseExpires of an Acquired entry is measured from before the request, so
// the owner never believes its lease lasts longer than Redis does; that of a
// Pending entry from after the answer, so a waiter never gives up on a lease
// Redis still holds.
func (s *Store) Reserve(ctx context.Context, key string, claim idempotency.Claim) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	if claim.Token == "" {
		return idempotency.Entry{}, errors.New("redisstore: Reserve needs a non-empty Claim.Token")
	}
	if err := checkKey(key); err != nil {
		return idempotency.Entry{}, err
	}
	lease, err := millis("Claim.Lease", claim.Lease)
	if err != nil {
		return idempotency.Entry{}, err
	}
	pending := pendingValue(owner(claim.Token), claim.Fingerprint)

	rk := s.redisKey(key)
	start := time.Now()
	var res []any
	if s.acks == nil {
		res, err = s.run(ctx, reserveScript, rk, pending, lease).Slice()
	} else {
		res, err = s.acks.reserve(ctx, rk, pending, lease)
	}
	if err != nil {
		return idempotency.Entry{}, fmt.Errorf("redisstore: reserve: %w", err)
	}
	if len(res) == 1 {
		return idempotency.Entry{State: idempotency.Acquired, Token: claim.Token, LeaseExpires: start.Add(claim.Lease)}, nil
	}
	e, err := decodeReply(res, time.Now())
	if err != nil {
		return idempotency.Entry{}, fmt.Errorf("redisstore: reserve %q: %w", key, err)
	}
	if e.State == idempotency.Pending && e.Token == claim.Token {
		// Our own claim, written by an earlier attempt of this very call
		// whose answer was lost and which go-redis retried.
		ttl := time.Until(e.LeaseExpires)
		if s.acks != nil {
			// That attempt's write is not known to be on the replicas:
			// renew it, and wait for them, on one connection.
			if err := s.acks.renew(ctx, rk, owner(claim.Token), lease, pending); err != nil {
				return idempotency.Entry{}, fmt.Errorf("redisstore: reserve: %w", err)
			}
			ttl = claim.Lease
		}
		return idempotency.Entry{State: idempotency.Acquired, Token: claim.Token, LeaseExpires: start.Add(ttl)}, nil
	}
	return e, nil
}

// Lookup implements idempotency.Store.
func (s *Store) Lookup(ctx context.Context, key string) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	res, err := s.run(ctx, lookupScript, s.redisKey(key)).Slice()
	if err != nil {
		return idempotency.Entry{}, fmt.Errorf("redisstore: lookup: %w", err)
	}
	if len(res) == 1 {
		return idempotency.Entry{State: idempotency.Absent}, nil
	}
	e, err := decodeReply(res, time.Now())
	if err != nil {
		return idempotency.Entry{}, fmt.Errorf("redisstore: lookup %q: %w", key, err)
	}
	return e, nil
}

// decodeReply decodes {2, value, pttl} from reserveScript or lookupScript;
// now is when the answer came.
func decodeReply(res []any, now time.Time) (idempotency.Entry, error) {
	if len(res) != 3 {
		return idempotency.Entry{}, fmt.Errorf("unexpected script reply %v", res)
	}
	v, ok1 := res[1].(string)
	pttl, ok2 := res[2].(int64)
	if !ok1 || !ok2 {
		return idempotency.Entry{}, fmt.Errorf("unexpected script reply types %T, %T", res[1], res[2])
	}
	return decode(v, pttl, now)
}

// decode parses a stored value (see scripts.go).
func decode(v string, pttl int64, now time.Time) (idempotency.Entry, error) {
	if v == "" || (v[0] != 'P' && v[0] != 'C') {
		return idempotency.Entry{}, errors.New("the Redis key holds a value this store did not write")
	}
	tag := v[0]
	rest := v[1:]
	if tag == 'P' {
		if rest == "" {
			return idempotency.Entry{}, errors.New("truncated pending value")
		}
		rest = rest[1:] // the waiter flag
	}
	token, rest, err := splitOwner(rest)
	if err != nil {
		return idempotency.Entry{}, err
	}
	if pttl < 0 {
		// PTTL is -1 for a key without expiry: not something this store
		// writes, and a lease that never ends would hold the key forever.
		return idempotency.Entry{}, errors.New("the Redis key has no expiry; it was changed outside this store")
	}
	if tag == 'C' {
		return idempotency.Entry{
			State:   idempotency.Completed,
			Record:  []byte(rest),
			Expires: now.Add(time.Duration(pttl) * time.Millisecond),
		}, nil
	}
	var fp []byte
	if rest != "" {
		fp = []byte(rest)
	}
	return idempotency.Entry{
		State:       idempotency.Pending,
		Token:       token,
		Fingerprint: fp,
		// PTTL counts whole milliseconds left, rounded down.
		LeaseExpires: now.Add(time.Duration(pttl+1) * time.Millisecond),
	}, nil
}

func splitOwner(v string) (token, rest string, err error) {
	colon := strings.IndexByte(v, ':')
	if colon <= 0 {
		return "", "", errors.New("malformed owner in stored value")
	}
	n, err := strconv.Atoi(v[:colon])
	if err != nil || n < 0 || n > len(v)-colon-1 {
		return "", "", errors.New("malformed owner in stored value")
	}
	return v[colon+1 : colon+1+n], v[colon+1+n:], nil
}

// Renew implements idempotency.Store in one round trip. It extends the lease
// if key is pending under claim.Token. If key is absent (the lease ran out in
// Redis, during a pause of the owner's process or a cut to Redis longer than
// the lease, and nobody took the key), it takes the key back under claim,
// fingerprint included, in the same script: the owner is still running, and
// would otherwise leave the key free for a duplicate to run again. It
// returns ErrNotOwner if another owner holds key or it is completed.
func (s *Store) Renew(ctx context.Context, key string, claim idempotency.Claim) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	if claim.Token == "" {
		return errors.New("redisstore: Renew needs a non-empty Claim.Token")
	}
	if err := checkKey(key); err != nil {
		return err
	}
	ms, err := millis("Claim.Lease", claim.Lease)
	if err != nil {
		return err
	}
	ow := owner(claim.Token)
	if s.acks != nil {
		err := s.acks.renew(ctx, s.redisKey(key), ow, ms, pendingValue(ow, claim.Fingerprint))
		if err != nil && !errors.Is(err, idempotency.ErrNotOwner) {
			return fmt.Errorf("redisstore: renew: %w", err)
		}
		return err
	}
	n, err := s.run(ctx, renewScript, s.redisKey(key), ow, ms, pendingValue(ow, claim.Fingerprint)).Int()
	if err != nil {
		return fmt.Errorf("redisstore: renew: %w", err)
	}
	if n == 0 {
		return idempotency.ErrNotOwner
	}
	return nil
}

// Complete implements idempotency.Store in one round trip. Completing again
// with the same token and the same record succeeds without change, so that a
// retried command is harmless. With WithReplicaAcks it succeeds only once
// the record is on that many replicas.
func (s *Store) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	if err := checkKey(key); err != nil {
		return err
	}
	ms, err := millis("retention", retention)
	if err != nil {
		return err
	}
	ow := owner(token)
	value := make([]byte, 0, 1+len(ow)+len(record))
	value = append(value, 'C')
	value = append(value, ow...)
	value = append(value, record...)
	var n int
	if s.acks == nil {
		n, err = s.run(ctx, completeScript, s.redisKey(key), ow, value, ms, token).Int()
	} else {
		n, err = s.acks.complete(ctx, s.redisKey(key), ow, value, ms, token)
	}
	if err != nil {
		return fmt.Errorf("redisstore: complete: %w", err)
	}
	if n == 0 {
		return idempotency.ErrNotOwner
	}
	return nil
}

// Release implements idempotency.Store.
func (s *Store) Release(ctx context.Context, key, token string) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	n, err := s.run(ctx, releaseScript, s.redisKey(key), owner(token), token).Int()
	if err != nil {
		return fmt.Errorf("redisstore: release: %w", err)
	}
	if n == 0 {
		return idempotency.ErrNotOwner
	}
	return nil
}

// Wait implements idempotency.Store. It subscribes the Store's shared
// subscriber to the key's channel, waits until Redis confirms it, and only
// then checks the key and marks it as waited on, so a Complete or Release
// after that check is always published to it. It also wakes when the lease
// runs out, and re-checks the key every recheck interval in case a
// notification was lost. A Redis error while checking ends the wait with that
// error.
func (s *Store) Wait(ctx context.Context, key string, seen idempotency.Entry) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	rk := s.redisKey(key)
	w := s.hub.add(rk, seen.Token)
	defer s.hub.remove(w)

	recheck := time.NewTicker(s.recheck)
	defer recheck.Stop()
	lease := time.NewTimer(time.Until(seen.LeaseExpires))
	defer lease.Stop()

	// Until the subscription is confirmed a notification could be missed,
	// so the key is first checked once it is, or after a recheck interval
	// if the subscriber is down; then at each notification or recheck.
	ready := w.sub.ready
	ow := owner(seen.Token)
	for {
		select {
		case <-ready:
		case <-w.signal:
			if w.ended.Load() {
				return nil
			}
		case <-recheck.C:
		case <-lease.C:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-s.hub.closing:
			return idempotency.ErrClosed
		}
		ready = nil // confirmed, or no longer waited for
		res, err := s.run(ctx, watchScript, rk, ow).Slice()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("redisstore: wait: %w", err)
		}
		if len(res) != 2 {
			return nil // no longer pending under seen.Token
		}
		// A renewed lease is waited for to its new end: waking at the old
		// one would only cost the caller a Reserve that finds it held.
		if pttl, ok := res[1].(int64); ok && pttl >= 0 {
			lease.Reset(time.Duration(pttl+1) * time.Millisecond)
		}
	}
}

// Health implements idempotency.HealthChecker: it pings Redis (every
// master, on a Redis Cluster), and returns idempotency.ErrClosed once the
// store is closed.
func (s *Store) Health(ctx context.Context) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	if cc, ok := s.client.(*redis.ClusterClient); ok {
		return cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
			return c.Ping(ctx).Err()
		})
	}
	return s.client.Ping(ctx).Err()
}

var _ idempotency.HealthChecker = (*Store)(nil)

// Close stops the Store's subscriber and wakes its waiters with ErrClosed.
// With WithAutoPipelining it also closes the client's AutoPipeliner, once
// that has sent what it held. It does not close the Redis client passed to
// New, and leaves every key in Redis as it is: other replicas go on using
// them. Calls made after Close return ErrClosed.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.hub.close()
	if s.pipe != nil {
		return s.pipe.close()
	}
	return nil
}
