package redisstore_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestReplicaAcksRejectsBadInput(t *testing.T) {
	c := redis.NewClient(&redis.Options{Addr: redisAddr()})
	defer c.Close()
	_, err := redisstore.New(c, redisstore.WithReplicaAcks(0, time.Second))
	require.ErrorContains(t, err, "at least 1 replica")
	_, err = redisstore.New(c, redisstore.WithReplicaAcks(1, 0))
	require.ErrorContains(t, err, "timeout above zero")
	_, err = redisstore.New(c, redisstore.WithReplicaAcks(1, 5*time.Second))
	require.ErrorContains(t, err, "shorter than the Redis client's ReadTimeout 5s")

	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": redisAddr()}})
	defer ring.Close()
	_, err = redisstore.New(ring, redisstore.WithReplicaAcks(1, time.Second))
	require.ErrorContains(t, err, "*redis.Ring")
}

// On a Redis without replicas, a Store that needs one takes no key and
// stores no record, and says why; what writes nothing (a replay, a lookup)
// works as before. Through the interceptors, the caller gets Unavailable,
// the handler does not run, and the key is released for its retry.
func TestReplicaAcksWithoutReplicas(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	info, err := c.Info(ctx, "replication").Result()
	require.NoError(t, err)
	if !strings.Contains(info, "connected_slaves:0") {
		t.Skipf("the Redis at %s has replicas; this test needs one without", redisAddr())
	}
	prefix := testPrefix(t, c)
	plain := newStore(t, c, prefix)
	acked := newStore(t, newClient(t), prefix, redisstore.WithReplicaAcks(1, 50*time.Millisecond))

	_, err = acked.Reserve(ctx, "k", claim("t"))
	require.ErrorContains(t, err, "0 of 1 within 50ms (WithReplicaAcks)")
	// The write stays on the master; the interceptors release it.
	require.NoError(t, acked.Release(ctx, "k", "t"))

	_, err = plain.Reserve(ctx, "done", claim("a"))
	require.NoError(t, err)
	require.ErrorContains(t, acked.Complete(ctx, "done", "a", []byte("rec"), time.Hour), "0 of 1")
	e, err := acked.Reserve(ctx, "done", claim("b"))
	require.NoError(t, err, "a replay writes nothing and waits for no replica")
	assert.Equal(t, idempotency.Completed, e.State)
	assert.Equal(t, []byte("rec"), e.Record)
	require.ErrorIs(t, acked.Renew(ctx, "done", claim("a")), idempotency.ErrNotOwner)

	var runs atomic.Int64
	client := serveReplica(t, acked, &faultService{execs: &runs})
	r := chargeVia(ctx, client, "via-grpc", "acct")
	require.Equal(t, codes.Unavailable, status.Code(r.err), "%v", r.err)
	assert.Zero(t, runs.Load())
	require.Eventually(t, func() bool {
		e, err := plain.Lookup(ctx, idempotency.StoreKey("", "via-grpc"))
		return err == nil && e.State == idempotency.Absent
	}, eventually, 10*time.Millisecond, "the key of the refused call is released")
}
