package redisstore_test

import (
	"context"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/grpcidem/idempotency/storetest"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// newClusterClient returns a client of the Redis Cluster whose nodes
// REDIS_CLUSTER_ADDRS lists (comma-separated); .ci/redis-cluster starts one
// on loopback. Without the variable the cluster tests skip, and fail with
// CI=true, where .ci/run starts the cluster.
func newClusterClient(t *testing.T) *redis.ClusterClient {
	t.Helper()
	addrs := os.Getenv("REDIS_CLUSTER_ADDRS")
	if addrs == "" {
		msg := `set REDIS_CLUSTER_ADDRS (comma-separated node addresses) to run the Redis Cluster tests; eval "$(.ci/redis-cluster start)" starts one on loopback`
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	c := redis.NewClusterClient(&redis.ClusterOptions{Addrs: strings.Split(addrs, ",")})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := c.ForEachShard(ctx, func(ctx context.Context, n *redis.Client) error { return n.Ping(ctx).Err() }); err != nil {
		_ = c.Close()
		t.Fatalf("Redis Cluster at %s is unreachable: %v", addrs, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// On a cluster, every script touches one key (so no CROSSSLOT error), keys
// spread over the slots, and waiters hear a Complete made through another
// node, PUBLISH being broadcast over the cluster bus.
func TestClusterConformance(t *testing.T) { forEachMode(t, testClusterConformance) }

func testClusterConformance(t *testing.T, m storeMode) {
	admin := newClusterClient(t)
	prefix := testPrefix(t, admin)
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		s, err := redisstore.New(newClusterClient(t), m.with(redisstore.WithPrefix(prefix))...)
		if err != nil {
			t.Fatalf("redisstore.New: %v", err)
		}
		t.Cleanup(func() { _ = s.Close() })
		return s
	}, storetest.SharedBackend(), storetest.ClockTolerance(clockTolerance), storetest.UnorderedListing())
}

func TestClusterSpreadsKeysAndWakesAcrossNodes(t *testing.T) {
	forEachMode(t, testClusterSpreadsKeysAndWakesAcrossNodes)
}

func testClusterSpreadsKeysAndWakesAcrossNodes(t *testing.T, m storeMode) {
	ctx := context.Background()
	admin := newClusterClient(t)
	prefix := testPrefix(t, admin)
	a := m.store(t, newClusterClient(t), prefix, noRecheck)
	b := m.store(t, newClusterClient(t), prefix, noRecheck)

	// The same braces in every caller key must not pin them to one slot.
	slots := map[int64]bool{}
	for i := range 64 {
		key := "{tenant}/" + randomHex(8)
		_, err := a.Reserve(ctx, key, claim("t"))
		require.NoError(t, err)
		slot, err := admin.ClusterKeySlot(ctx, redisstore.RedisKey(a, key)).Result()
		require.NoError(t, err)
		slots[slot] = true

		if i%8 == 0 {
			seen, err := b.Reserve(ctx, key, claim("u"))
			require.NoError(t, err)
			require.Equal(t, idempotency.Pending, seen.State)
			done := goWait(ctx, b, key, seen)
			waitForWaiter(t, admin, a, key)
			require.NoError(t, a.Complete(ctx, key, "t", []byte("r"), time.Minute))
			require.NoError(t, waitResult(t, done))
		}
	}
	assert.Greater(t, len(slots), 32, "64 keys landed in %d slots", len(slots))
}

// A slot of the store's key moves to another master while the store works
// on it: during the migration the key's commands get ASK (the key has
// moved, the slot not yet), and after it MOVED, which the store's client
// follows, plain or auto-pipelined. The slot is moved back at the end.
func TestClusterSlotMigration(t *testing.T) { forEachMode(t, testClusterSlotMigration) }

func testClusterSlotMigration(t *testing.T, m storeMode) {
	ctx := context.Background()
	admin := newClusterClient(t)
	prefix := testPrefix(t, admin)
	// A client of its own, whose node clients count the redirects they get
	// (newClusterClient has made its node clients already).
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: admin.Options().Addrs})
	t.Cleanup(func() { _ = cc.Close() })
	redirects := &redirectLog{}
	cc.OnNewNode(func(n *redis.Client) { n.AddHook(redirects) })
	s := m.store(t, cc, prefix)
	const key = "migrating"
	rk := redisstore.RedisKey(s, key)
	_, err := s.Reserve(ctx, key, claim("t"))
	require.NoError(t, err)

	slot, err := admin.ClusterKeySlot(ctx, rk).Result()
	require.NoError(t, err)
	src, err := admin.MasterForKey(ctx, rk)
	require.NoError(t, err)
	var (
		mu  sync.Mutex
		dst *redis.Client
	)
	require.NoError(t, admin.ForEachMaster(ctx, func(ctx context.Context, n *redis.Client) error {
		mu.Lock()
		defer mu.Unlock()
		if n.Options().Addr != src.Options().Addr && (dst == nil || n.Options().Addr < dst.Options().Addr) {
			dst = n
		}
		return nil
	}))
	require.NotNil(t, dst, "the cluster has one master")
	migrateSlot(t, admin, int(slot), src, dst, false)
	t.Cleanup(func() { migrateSlot(t, admin, int(slot), dst, src, true) })

	// ASK: the key is on dst, the slot still src's.
	require.NoError(t, s.Complete(ctx, key, "t", []byte("r"), time.Minute))
	assert.Positive(t, redirects.ask.Load(), "Complete got no ASK; the test proves nothing")
	finishSlot(t, admin, int(slot), dst)
	// MOVED: the client still takes the slot for src's.
	e, err := s.Lookup(ctx, key)
	require.NoError(t, err)
	assert.Positive(t, redirects.moved.Load(), "Lookup got no MOVED; the test proves nothing")
	assert.Equal(t, idempotency.Completed, e.State)
	assert.Equal(t, []byte("r"), e.Record)
	n, err := dst.Exists(ctx, rk).Result()
	require.NoError(t, err)
	assert.Equal(t, int64(1), n, "the record is not on the slot's new master")
}

// migrateSlot starts moving slot from src to dst and moves its keys; with
// finish it also hands the slot over to dst.
func migrateSlot(t *testing.T, admin *redis.ClusterClient, slot int, src, dst *redis.Client, finish bool) {
	t.Helper()
	ctx := context.Background()
	srcID, err := src.ClusterMyID(ctx).Result()
	require.NoError(t, err)
	dstID, err := dst.ClusterMyID(ctx).Result()
	require.NoError(t, err)
	require.NoError(t, dst.Do(ctx, "cluster", "setslot", slot, "importing", srcID).Err())
	require.NoError(t, src.Do(ctx, "cluster", "setslot", slot, "migrating", dstID).Err())
	host, port, _ := strings.Cut(dst.Options().Addr, ":")
	for {
		keys, err := src.ClusterGetKeysInSlot(ctx, slot, 100).Result()
		require.NoError(t, err)
		if len(keys) == 0 {
			break
		}
		args := []any{"migrate", host, port, "", 0, 5000, "keys"}
		for _, k := range keys {
			args = append(args, k)
		}
		require.NoError(t, src.Do(ctx, args...).Err())
	}
	if finish {
		finishSlot(t, admin, slot, dst)
	}
}

// finishSlot assigns slot to dst on every master.
func finishSlot(t *testing.T, admin *redis.ClusterClient, slot int, dst *redis.Client) {
	t.Helper()
	ctx := context.Background()
	dstID, err := dst.ClusterMyID(ctx).Result()
	require.NoError(t, err)
	require.NoError(t, dst.Do(ctx, "cluster", "setslot", slot, "node", dstID).Err())
	require.NoError(t, admin.ForEachMaster(ctx, func(ctx context.Context, n *redis.Client) error {
		return n.Do(ctx, "cluster", "setslot", slot, "node", dstID).Err()
	}))
}

// redirectLog is a redis.Hook for a cluster's node clients that counts the
// ASK and MOVED replies they get.
type redirectLog struct{ ask, moved atomic.Int64 }

func (h *redirectLog) note(err error) {
	if err != nil {
		if _, ok := redis.IsAskError(err); ok {
			h.ask.Add(1)
		}
		if _, ok := redis.IsMovedError(err); ok {
			h.moved.Add(1)
		}
	}
}

func (h *redirectLog) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *redirectLog) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		h.note(err)
		return err
	}
}

func (h *redirectLog) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		for _, cmd := range cmds {
			h.note(cmd.Err())
		}
		return err
	}
}
