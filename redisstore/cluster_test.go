package redisstore_test

import (
	"context"
	"os"
	"strings"
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
