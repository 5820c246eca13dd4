package redisstore_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/grpcidem/idempotency/redisstore"
	"github.com/redis/go-redis/v9"

	"github.com/grpcidem/idempotency"
)

func redisAddr() string {
	if a := os.Getenv("REDIS_ADDR"); a != "" {
		return a
	}
	return "127.0.0.1:6379"
}

// reachable pings the test Redis once per run, so that a missing Redis
// costs one dial timeout rather than one per test.
var reachable = sync.OnceValue(func() error {
	c := redis.NewClient(&redis.Options{Addr: redisAddr(), MaxRetries: -1})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.Ping(ctx).Err()
})

// newClient returns a client of the test Redis, closed at cleanup. When
// Redis is unreachable the test is skipped, unless CI=true, where it fails:
// a CI run must never pass by skipping.
func newClient(tb testing.TB, opts ...func(*redis.Options)) *redis.Client {
	tb.Helper()
	if err := reachable(); err != nil {
		msg := "Redis at " + redisAddr() + " is unreachable (" + err.Error() + "); set REDIS_ADDR or start one: " +
			`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no`
		if os.Getenv("CI") == "true" {
			tb.Fatal(msg)
		}
		tb.Skip(msg)
	}
	o := &redis.Options{Addr: redisAddr()}
	for _, f := range opts {
		f(o)
	}
	c := redis.NewClient(o)
	tb.Cleanup(func() { _ = c.Close() })
	return c
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// testPrefix returns a fresh key prefix, and deletes every key under it at
// cleanup, so that runs neither collide nor leave keys behind.
func testPrefix(tb testing.TB, c redis.UniversalClient) string {
	tb.Helper()
	prefix := "idemtest:" + randomHex(6) + ":"
	tb.Cleanup(func() {
		ctx := context.Background()
		var err error
		if cc, ok := c.(*redis.ClusterClient); ok {
			err = cc.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error {
				return deleteKeys(ctx, node, prefix)
			})
		} else {
			err = deleteKeys(ctx, c, prefix)
		}
		if err != nil {
			tb.Errorf("cleanup of %s*: %v", prefix, err)
		}
	})
	return prefix
}

// deleteKeys deletes the keys under prefix on one server, one by one since
// on a cluster node they belong to different slots.
func deleteKeys(ctx context.Context, c redis.Cmdable, prefix string) error {
	iter := c.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	var keys []string
	for iter.Next(ctx) {
		keys = append(keys, iter.Val())
	}
	if err := iter.Err(); err != nil {
		return err
	}
	_, err := c.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, k := range keys {
			p.Del(ctx, k)
		}
		return nil
	})
	return err
}

// newStore returns a Store on c under prefix, closed at cleanup.
func newStore(tb testing.TB, c redis.UniversalClient, prefix string, opts ...redisstore.Option) *redisstore.Store {
	tb.Helper()
	s, err := redisstore.New(c, append([]redisstore.Option{redisstore.WithPrefix(prefix)}, opts...)...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = s.Close() })
	return s
}

// redisKeys returns the Redis keys under prefix.
func redisKeys(tb testing.TB, c redis.UniversalClient, prefix string) []string {
	tb.Helper()
	keys, err := c.Keys(context.Background(), prefix+"*").Result()
	if err != nil {
		tb.Fatal(err)
	}
	return keys
}

// commandCounter is a redis.Hook counting the commands a client sends, which
// for single commands is its round trips.
type commandCounter struct {
	n      atomic.Int64
	store  atomic.Int64 // n less the handshake of new connections
	direct atomic.Int64 // of store, those sent with a context from callerContext
	names  sync.Map     // command name -> *atomic.Int64
}

func (h *commandCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *commandCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.add(ctx, cmd)
		return next(ctx, cmd)
	}
}

func (h *commandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			h.add(ctx, cmd)
		}
		return next(ctx, cmds)
	}
}

func (h *commandCounter) add(ctx context.Context, cmd redis.Cmder) {
	h.n.Add(1)
	name := strings.ToLower(cmd.Name())
	v, _ := h.names.LoadOrStore(name, new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
	switch name {
	case "hello", "client", "auth", "select":
		return
	}
	h.store.Add(1)
	if ctx.Value(callerKey{}) != nil {
		h.direct.Add(1)
	}
}

type callerKey struct{}

// callerContext marks the commands sent on the caller's own context, which a
// go-redis AutoPipeliner does not pass on: it sends on its own.
func callerContext() context.Context {
	return context.WithValue(context.Background(), callerKey{}, true)
}

// commands returns how many commands the store sent: all but the handshake
// of new connections (which the background subscriber may open at any time).
func (h *commandCounter) commands() int64 { return h.store.Load() }

func (h *commandCounter) count(name string) int64 {
	v, ok := h.names.Load(name)
	if !ok {
		return 0
	}
	return v.(*atomic.Int64).Load()
}

// pubSubIDs returns the ids of the pub/sub connections of the clients named
// name.
func pubSubIDs(tb testing.TB, c redis.UniversalClient, name string) []string {
	tb.Helper()
	list, err := c.ClientList(context.Background()).Result()
	if err != nil {
		tb.Fatal(err)
	}
	var ids []string
	for _, line := range strings.Split(list, "\n") {
		fields := map[string]string{}
		for _, f := range strings.Fields(line) {
			k, v, _ := strings.Cut(f, "=")
			fields[k] = v
		}
		if fields["name"] == name && strings.Contains(fields["flags"], "P") {
			ids = append(ids, fields["id"])
		}
	}
	return ids
}

// killPubSub closes, from the server side, the pub/sub connections of the
// clients named name, as a network failure would.
func killPubSub(tb testing.TB, c redis.UniversalClient, name string) int {
	tb.Helper()
	ids := pubSubIDs(tb, c, name)
	for _, id := range ids {
		if err := c.Do(context.Background(), "CLIENT", "KILL", "ID", id).Err(); err != nil {
			tb.Fatal(err)
		}
	}
	return len(ids)
}

// mustServer returns the idempotency server of a test; an option out of range
// is a bug in the test.
func mustServer(store idempotency.Store, opts ...idempotency.Option) *idempotency.Server {
	s, err := idempotency.NewServer(store, opts...)
	if err != nil {
		panic(err)
	}
	return s
}

// A storeMode is how a test's stores send their commands to Redis. The tests
// of what can go wrong between a Store and Redis (the conformance suite,
// faults, pauses, waiters, clusters) run in every mode, as subtests.
type storeMode struct {
	name string
	opts []redisstore.Option
}

var (
	plainMode     = storeMode{name: "plain"}
	pipelinedMode = storeMode{name: "autopipelined", opts: []redisstore.Option{redisstore.WithAutoPipelining()}}
	storeModes    = []storeMode{plainMode, pipelinedMode}
)

// forEachMode runs f as a subtest per storeMode.
func forEachMode(t *testing.T, f func(t *testing.T, m storeMode)) {
	t.Helper()
	for _, m := range storeModes {
		t.Run(m.name, func(t *testing.T) { f(t, m) })
	}
}

// store returns a Store on c under prefix in mode m, closed at cleanup.
func (m storeMode) store(tb testing.TB, c redis.UniversalClient, prefix string, opts ...redisstore.Option) *redisstore.Store {
	tb.Helper()
	return newStore(tb, c, prefix, slices.Concat(m.opts, opts)...)
}

// with returns the options of mode m followed by opts.
func (m storeMode) with(opts ...redisstore.Option) []redisstore.Option {
	return slices.Concat(m.opts, opts)
}
