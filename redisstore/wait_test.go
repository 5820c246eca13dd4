package redisstore_test

import (
	"bytes"
	"context"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// noRecheck keeps waiters from re-checking by themselves during a test, so
// that only a notification (or a reconnect) can wake them.
var noRecheck = redisstore.WithRecheckInterval(time.Hour)

// goWait runs s.Wait in a goroutine and returns its result channel.
func goWait(ctx context.Context, s *redisstore.Store, key string, seen idempotency.Entry) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- s.Wait(ctx, key, seen) }()
	return ch
}

func waitResult(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(eventually):
		t.Fatalf("Wait did not return within %v", eventually)
		return nil
	}
}

// warmWatch loads the watch script into Redis, so that command counts
// afterwards are not off by one NOSCRIPT retry.
func warmWatch(t *testing.T, s *redisstore.Store) {
	t.Helper()
	require.NoError(t, s.Wait(context.Background(), "warm-up", idempotency.Entry{State: idempotency.Pending, Token: "x", LeaseExpires: time.Now().Add(time.Minute)}))
}

// One store reserves, a store on another client (another replica) waits, and
// the first one's Complete wakes it through pub/sub: with periodic re-checks
// off, the waiter sends exactly one command in all its wait.
func TestWaitWokenAcrossStores(t *testing.T) { forEachMode(t, testWaitWokenAcrossStores) }

func testWaitWokenAcrossStores(t *testing.T, m storeMode) {
	ctx := context.Background()
	ca := newClient(t)
	counter := &commandCounter{}
	cb := newClient(t)
	cb.AddHook(counter)
	prefix := testPrefix(t, ca)
	a := m.store(t, ca, prefix)
	b := m.store(t, cb, prefix, noRecheck)
	warmWatch(t, b)

	_, err := a.Reserve(ctx, "k", claim("a"))
	require.NoError(t, err)
	seen, err := b.Reserve(ctx, "k", claim("b"))
	require.NoError(t, err)
	require.Equal(t, idempotency.Pending, seen.State)

	before := counter.commands()
	done := goWait(ctx, b, "k", seen)
	waitForWaiter(t, ca, a, "k")
	require.NoError(t, a.Complete(ctx, "k", "a", []byte("outcome"), time.Hour))
	require.NoError(t, waitResult(t, done))
	assert.Equal(t, int64(1), counter.commands()-before, "commands sent by the waiter while waiting")

	e, err := b.Reserve(ctx, "k", claim("b"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Completed, e.State)
	assert.Equal(t, []byte("outcome"), e.Record)
}

func TestWaitWokenByRelease(t *testing.T) { forEachMode(t, testWaitWokenByRelease) }

func testWaitWokenByRelease(t *testing.T, m storeMode) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	a := m.store(t, c, prefix)
	b := m.store(t, newClient(t), prefix, noRecheck)

	_, err := a.Reserve(ctx, "k", claim("a"))
	require.NoError(t, err)
	seen, err := b.Reserve(ctx, "k", claim("b"))
	require.NoError(t, err)
	done := goWait(ctx, b, "k", seen)
	waitForWaiter(t, c, a, "k")
	require.NoError(t, a.Release(ctx, "k", "a"))
	require.NoError(t, waitResult(t, done))
	e, err := b.Reserve(ctx, "k", claim("b"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Acquired, e.State)
}

// Wait must not miss what happened between the Reserve that saw the key
// pending and the Wait: it returns at once.
func TestWaitReturnsAtOnceWhenAlreadyChanged(t *testing.T) {
	forEachMode(t, testWaitReturnsAtOnceWhenAlreadyChanged)
}

func testWaitReturnsAtOnceWhenAlreadyChanged(t *testing.T, m storeMode) {
	ctx := context.Background()
	c := newClient(t)
	s := m.store(t, c, testPrefix(t, c), noRecheck)

	_, err := s.Reserve(ctx, "done", claim("a"))
	require.NoError(t, err)
	seen, err := s.Reserve(ctx, "done", claim("b"))
	require.NoError(t, err)
	require.NoError(t, s.Complete(ctx, "done", "a", []byte("r"), time.Hour))
	require.NoError(t, waitResult(t, goWait(ctx, s, "done", seen)))

	_, err = s.Reserve(ctx, "released", claim("a"))
	require.NoError(t, err)
	seen, err = s.Reserve(ctx, "released", claim("b"))
	require.NoError(t, err)
	require.NoError(t, s.Release(ctx, "released", "a"))
	require.NoError(t, waitResult(t, goWait(ctx, s, "released", seen)))

	// Taken over by another owner since.
	_, err = s.Reserve(ctx, "taken", claim("c"))
	require.NoError(t, err)
	require.NoError(t, waitResult(t, goWait(ctx, s, "taken", seen)))
}

func TestWaitEndsWithContext(t *testing.T) { forEachMode(t, testWaitEndsWithContext) }

func testWaitEndsWithContext(t *testing.T, m storeMode) {
	ctx := context.Background()
	c := newClient(t)
	s := m.store(t, c, testPrefix(t, c))

	_, err := s.Reserve(ctx, "k", claim("a"))
	require.NoError(t, err)
	seen, err := s.Reserve(ctx, "k", claim("b"))
	require.NoError(t, err)

	wctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	assert.ErrorIs(t, waitResult(t, goWait(wctx, s, "k", seen)), context.DeadlineExceeded)

	cctx, cancel := context.WithCancel(ctx)
	done := goWait(cctx, s, "k", seen)
	waitForWaiter(t, c, s, "k")
	cancel()
	assert.ErrorIs(t, waitResult(t, done), context.Canceled)

	// Still pending: the waits ended by their contexts alone.
	e, err := s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)
}

// A renewed lease is waited for to its new end, not to the one seen.
func TestWaitFollowsRenewal(t *testing.T) { forEachMode(t, testWaitFollowsRenewal) }

func testWaitFollowsRenewal(t *testing.T, m storeMode) {
	ctx := context.Background()
	c := newClient(t)
	s := m.store(t, c, testPrefix(t, c), noRecheck)

	_, err := s.Reserve(ctx, "k", idempotency.Claim{Token: "a", Lease: 300 * time.Millisecond})
	require.NoError(t, err)
	seen, err := s.Reserve(ctx, "k", claim("b"))
	require.NoError(t, err)
	require.NoError(t, s.Renew(ctx, "k", idempotency.Claim{Token: "a", Lease: time.Hour}))
	done := goWait(ctx, s, "k", seen)
	waitForWaiter(t, c, s, "k")
	select {
	case err := <-done:
		t.Fatalf("Wait returned %v at the end of a lease that had been renewed", err)
	case <-time.After(time.Until(seen.LeaseExpires) + 200*time.Millisecond):
	}
	require.NoError(t, s.Complete(ctx, "k", "a", []byte("r"), time.Hour))
	require.NoError(t, waitResult(t, done))
}

// Pub/sub delivers at most once. A change that publishes nothing (here
// written behind the store's back) still reaches the waiter through its
// periodic re-check.
func TestWaitRechecksWhenNotificationLost(t *testing.T) {
	forEachMode(t, testWaitRechecksWhenNotificationLost)
}

func testWaitRechecksWhenNotificationLost(t *testing.T, m storeMode) {
	ctx := context.Background()
	c := newClient(t)
	s := m.store(t, c, testPrefix(t, c), redisstore.WithRecheckInterval(100*time.Millisecond))

	_, err := s.Reserve(ctx, "k", claim("a"))
	require.NoError(t, err)
	seen, err := s.Reserve(ctx, "k", claim("b"))
	require.NoError(t, err)
	done := goWait(ctx, s, "k", seen)
	waitForWaiter(t, c, s, "k")
	require.NoError(t, c.Set(ctx, redisstore.RedisKey(s, "k"), "C1:arecord", time.Hour).Err())
	require.NoError(t, waitResult(t, done))
	e, err := s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, []byte("record"), e.Record)
}

// When the subscriber connection dies, the store reconnects, subscribes its
// waiters' channels again, and has every waiter re-check its key, since what
// was published meanwhile is lost.
func TestWaitSurvivesSubscriberLoss(t *testing.T) { forEachMode(t, testWaitSurvivesSubscriberLoss) }

func testWaitSurvivesSubscriberLoss(t *testing.T, m storeMode) {
	ctx := context.Background()
	name := "redisstore-test-" + randomHex(4)
	counter := &commandCounter{}
	c := newClient(t, func(o *redis.Options) { o.ClientName = name })
	c.AddHook(counter)
	owner := newClient(t)
	prefix := testPrefix(t, owner)
	s := m.store(t, c, prefix, noRecheck)
	o := m.store(t, owner, prefix)
	warmWatch(t, s)

	// lost: changed without a notification, then the connection dies.
	// kept: still pending through the reconnect, completed after it.
	var seen = map[string]idempotency.Entry{}
	var done = map[string]<-chan error{}
	for _, k := range []string{"lost", "kept"} {
		_, err := o.Reserve(ctx, k, claim("a"))
		require.NoError(t, err)
		seen[k], err = s.Reserve(ctx, k, claim("b"))
		require.NoError(t, err)
		done[k] = goWait(ctx, s, k, seen[k])
		waitForWaiter(t, owner, o, k)
	}
	watches := counter.count("evalsha")
	require.NoError(t, owner.Set(ctx, redisstore.RedisKey(o, "lost"), "C1:arecord", time.Hour).Err())
	require.Equal(t, 1, killPubSub(t, owner, name))

	require.NoError(t, waitResult(t, done["lost"]))
	// "kept" re-checked too: then its channel is subscribed again, and a
	// notification reaches it.
	deadline := time.Now().Add(eventually)
	for counter.count("evalsha") < watches+2 {
		require.True(t, time.Now().Before(deadline), "waiters did not re-check after the reconnect")
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case err := <-done["kept"]:
		t.Fatalf("Wait on a key still pending returned %v", err)
	default:
	}
	require.NoError(t, o.Complete(ctx, "kept", "a", []byte("r"), time.Hour))
	require.NoError(t, waitResult(t, done["kept"]))
}

// A short health-check interval makes the subscriber ping an idle
// connection; it answers, so the subscriber keeps its connection, and waiters
// go on working through it. (The interval leaves Redis 300ms to answer a
// ping, which even a loaded test machine does.)
func TestWaitWithHealthChecks(t *testing.T) { forEachMode(t, testWaitWithHealthChecks) }

func testWaitWithHealthChecks(t *testing.T, m storeMode) {
	ctx := context.Background()
	name := "redisstore-test-" + randomHex(4)
	c := newClient(t, func(o *redis.Options) { o.ClientName = name })
	s := m.store(t, c, testPrefix(t, c), noRecheck, redisstore.WithHealthCheckInterval(300*time.Millisecond))
	var ids []string
	for i := range 5 {
		_, err := s.Reserve(ctx, "k", claim("a"))
		require.NoError(t, err)
		seen, err := s.Reserve(ctx, "k", claim("b"))
		require.NoError(t, err)
		done := goWait(ctx, s, "k", seen)
		waitForWaiter(t, c, s, "k")
		ids = append(ids, pubSubIDs(t, c, name)...)
		time.Sleep(time.Duration(i) * 200 * time.Millisecond) // idle across pings
		require.NoError(t, s.Release(ctx, "k", "a"))
		require.NoError(t, waitResult(t, done))
	}
	require.Len(t, ids, 5)
	for _, id := range ids {
		assert.Equal(t, ids[0], id, "the subscriber reconnected although Redis answered its pings")
	}
}

// Clients that speak RESP2 get subscription replies and pongs in another
// shape; waiters work the same.
func TestWaitRESP2(t *testing.T) { forEachMode(t, testWaitRESP2) }

func testWaitRESP2(t *testing.T, m storeMode) {
	ctx := context.Background()
	resp2 := func(o *redis.Options) { o.Protocol = 2 }
	ca, cb := newClient(t, resp2), newClient(t, resp2)
	prefix := testPrefix(t, ca)
	a := m.store(t, ca, prefix)
	b := m.store(t, cb, prefix, noRecheck)
	for range 3 {
		_, err := a.Reserve(ctx, "k", claim("a"))
		require.NoError(t, err)
		seen, err := b.Reserve(ctx, "k", claim("b"))
		require.NoError(t, err)
		done := goWait(ctx, b, "k", seen)
		waitForWaiter(t, ca, a, "k")
		require.NoError(t, a.Release(ctx, "k", "a"))
		require.NoError(t, waitResult(t, done))
	}
}

// Complete and Release publish only for keys someone waits on. A raw
// subscriber on two keys' channels sees the notification of the waited key
// and none of the other, which completed first: one connection delivers in
// order.
func TestPublishOnlyWhenWaitedOn(t *testing.T) { forEachMode(t, testPublishOnlyWhenWaitedOn) }

func testPublishOnlyWhenWaitedOn(t *testing.T, m storeMode) {
	ctx := context.Background()
	c := newClient(t)
	s := m.store(t, c, testPrefix(t, c), noRecheck)

	for _, k := range []string{"quiet", "waited"} {
		_, err := s.Reserve(ctx, k, claim("a-"+k))
		require.NoError(t, err)
	}
	ps := c.Subscribe(ctx, redisstore.RedisKey(s, "quiet"), redisstore.RedisKey(s, "waited"))
	defer ps.Close()
	for range 2 {
		msg, err := ps.ReceiveTimeout(ctx, eventually)
		require.NoError(t, err)
		require.IsType(t, &redis.Subscription{}, msg)
	}
	seen, err := s.Reserve(ctx, "waited", claim("b"))
	require.NoError(t, err)
	done := goWait(ctx, s, "waited", seen)
	waitForWaiter(t, c, s, "waited")

	require.NoError(t, s.Complete(ctx, "quiet", "a-quiet", []byte("r"), time.Hour))
	require.NoError(t, s.Complete(ctx, "waited", "a-waited", []byte("r"), time.Hour))
	require.NoError(t, waitResult(t, done))
	msg, err := ps.ReceiveTimeout(ctx, eventually)
	require.NoError(t, err)
	require.IsType(t, &redis.Message{}, msg)
	assert.Equal(t, redisstore.RedisKey(s, "waited"), msg.(*redis.Message).Channel)
	assert.Equal(t, "a-waited", msg.(*redis.Message).Payload)
}

// Many waiters, on two stores, on one key and on others: one Complete wakes
// all of its key's waiters and none of the others, and the subscriptions are
// dropped once nobody waits.
func TestManyWaiters(t *testing.T) { forEachMode(t, testManyWaiters) }

func testManyWaiters(t *testing.T, m storeMode) {
	ctx := context.Background()
	ca, cb := newClient(t), newClient(t)
	prefix := testPrefix(t, ca)
	a := m.store(t, ca, prefix, noRecheck)
	b := m.store(t, cb, prefix, noRecheck)

	keys := []string{"k0", "k1", "k2"}
	var seen []idempotency.Entry
	for _, k := range keys {
		_, err := a.Reserve(ctx, k, claim("owner-"+k))
		require.NoError(t, err)
		e, err := b.Reserve(ctx, k, claim("w"))
		require.NoError(t, err)
		seen = append(seen, e)
	}
	var woken [3]atomic.Int32
	var wg sync.WaitGroup
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for i := range 48 {
		k := i % len(keys)
		st := []*redisstore.Store{a, b}[i%2]
		wg.Go(func() {
			if err := st.Wait(wctx, keys[k], seen[k]); err == nil {
				woken[k].Add(1)
			}
		})
	}
	for _, k := range keys {
		waitForWaiter(t, ca, a, k)
	}
	require.NoError(t, a.Complete(ctx, "k1", "owner-k1", []byte("r"), time.Hour))
	deadline := time.Now().Add(eventually)
	for woken[1].Load() < 16 {
		require.True(t, time.Now().Before(deadline), "only %d of 16 waiters woke", woken[1].Load())
		time.Sleep(5 * time.Millisecond)
	}
	require.NoError(t, a.Release(ctx, "k2", "owner-k2"))
	for woken[2].Load() < 16 {
		require.True(t, time.Now().Before(deadline), "only %d of 16 waiters woke", woken[2].Load())
		time.Sleep(5 * time.Millisecond)
	}
	assert.Equal(t, int32(0), woken[0].Load())
	cancel()
	wg.Wait()
	assert.Equal(t, int32(0), woken[0].Load())

	// Nobody waits any more: every channel is unsubscribed (asynchronously).
	for {
		n, err := ca.PubSubNumSub(ctx, redisstore.RedisKey(a, "k0"), redisstore.RedisKey(a, "k1"), redisstore.RedisKey(a, "k2")).Result()
		require.NoError(t, err)
		if n[redisstore.RedisKey(a, "k0")]+n[redisstore.RedisKey(a, "k1")]+n[redisstore.RedisKey(a, "k2")] == 0 {
			break
		}
		require.True(t, time.Now().Before(deadline), "subscriptions left: %v", n)
		time.Sleep(5 * time.Millisecond)
	}
}

// Replicas race for one key: exactly one Reserve wins, everyone else sees
// that winner.
func TestConcurrentReserveOneWinner(t *testing.T) { forEachMode(t, testConcurrentReserveOneWinner) }

func testConcurrentReserveOneWinner(t *testing.T, m storeMode) {
	ctx := context.Background()
	ca, cb := newClient(t), newClient(t)
	prefix := testPrefix(t, ca)
	stores := []*redisstore.Store{m.store(t, ca, prefix), m.store(t, cb, prefix)}

	for round := range 20 {
		key := "race-" + string(rune('a'+round))
		var acquired atomic.Int32
		var winner atomic.Value
		tokens := make([]string, 64)
		entries := make([]idempotency.Entry, 64)
		errs := make([]error, 64)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range 64 {
			tokens[i] = randomHex(16)
			wg.Go(func() {
				<-start
				entries[i], errs[i] = stores[i%2].Reserve(ctx, key, claim(tokens[i]))
				if errs[i] == nil && entries[i].State == idempotency.Acquired {
					acquired.Add(1)
					winner.Store(tokens[i])
				}
			})
		}
		close(start)
		wg.Wait()
		require.Equal(t, int32(1), acquired.Load(), "round %d", round)
		for i := range 64 {
			require.NoError(t, errs[i])
			if entries[i].State == idempotency.Pending {
				require.Equal(t, winner.Load(), entries[i].Token)
			}
		}
	}
}

// freezableConn is a connection whose incoming bytes can be made to stop,
// as when a NAT or a firewall silently drops an idle connection: reads then
// block until their deadline, and nothing tells the client.
type freezableConn struct {
	net.Conn
	pubsub   atomic.Bool // a SUBSCRIBE was written on it
	frozen   atomic.Bool
	deadline atomic.Pointer[time.Time]
	closed   chan struct{}
	once     sync.Once
}

func (c *freezableConn) Write(b []byte) (int, error) {
	if bytes.Contains(bytes.ToLower(b), []byte("subscribe")) {
		c.pubsub.Store(true)
	}
	return c.Conn.Write(b)
}

func (c *freezableConn) Read(b []byte) (int, error) {
	if !c.pubsub.Load() || !c.frozen.Load() {
		n, err := c.Conn.Read(b)
		if !c.pubsub.Load() || !c.frozen.Load() {
			return n, err
		}
		// Frozen while this read was blocked: what it got is lost.
	}
	var timeout <-chan time.Time
	if d := c.deadline.Load(); d != nil && !d.IsZero() {
		t := time.NewTimer(time.Until(*d))
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-timeout:
		return 0, os.ErrDeadlineExceeded
	case <-c.closed:
		return 0, net.ErrClosed
	}
}

func (c *freezableConn) SetReadDeadline(t time.Time) error {
	c.deadline.Store(&t)
	return c.Conn.SetReadDeadline(t)
}

func (c *freezableConn) SetDeadline(t time.Time) error {
	c.deadline.Store(&t)
	return c.Conn.SetDeadline(t)
}

func (c *freezableConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// A subscriber connection that goes silent is found out by the health check:
// the ping gets no answer, the store reconnects, and the waiter learns of the
// Complete whose notification went into the void.
func TestWaitSurvivesSilentSubscriber(t *testing.T) { forEachMode(t, testWaitSurvivesSilentSubscriber) }

func testWaitSurvivesSilentSubscriber(t *testing.T, m storeMode) {
	ctx := context.Background()
	var mu sync.Mutex
	var conns []*freezableConn
	c := newClient(t, func(o *redis.Options) {
		o.Dialer = func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			cn, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			fc := &freezableConn{Conn: cn, closed: make(chan struct{})}
			mu.Lock()
			conns = append(conns, fc)
			mu.Unlock()
			return fc, nil
		}
	})
	owner := newClient(t)
	prefix := testPrefix(t, owner)
	s := m.store(t, c, prefix, noRecheck, redisstore.WithHealthCheckInterval(100*time.Millisecond))
	o := m.store(t, owner, prefix)

	_, err := o.Reserve(ctx, "k", claim("a"))
	require.NoError(t, err)
	seen, err := s.Reserve(ctx, "k", claim("b"))
	require.NoError(t, err)
	done := goWait(ctx, s, "k", seen)
	waitForWaiter(t, owner, o, "k")

	// Freeze the subscriber's connection; the one it reconnects on works.
	mu.Lock()
	for _, fc := range conns {
		fc.frozen.Store(true)
	}
	mu.Unlock()
	require.NoError(t, o.Complete(ctx, "k", "a", []byte("r"), time.Hour))
	require.NoError(t, waitResult(t, done))
	e, err := s.Lookup(ctx, "k")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Completed, e.State)
}
