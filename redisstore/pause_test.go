//go:build unix

package redisstore_test

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/proto"
)

// These tests pause whole replica processes with SIGSTOP for longer than
// their lease (see child_test.go), as a frozen VM, a stop-the-world stall or
// a debugger does, while a handler runs.

// pause stops the child's process; resume lets it go on.
func (c *child) pause(t *testing.T) {
	t.Helper()
	require.NoError(t, syscall.Kill(c.cmd.Process.Pid, syscall.SIGSTOP))
}

func (c *child) resume(t *testing.T) {
	t.Helper()
	require.NoError(t, syscall.Kill(c.cmd.Process.Pid, syscall.SIGCONT))
}

// pauseEnv is what the parent of child replicas reads Redis with.
type pauseEnv struct {
	mode   storeMode // of the children's stores
	prefix string
	redis  *redis.Client
	store  *redisstore.Store // on the children's prefix, to look at keys
}

func newPauseEnv(t *testing.T, m storeMode) *pauseEnv {
	c := newClient(t)
	prefix := testPrefix(t, c)
	return &pauseEnv{mode: m, prefix: prefix, redis: c, store: newStore(t, c, prefix)}
}

// execs returns how often the handler ran for account, in every replica.
func (e *pauseEnv) execs(t *testing.T, account string) int {
	t.Helper()
	n, err := e.redis.Get(context.Background(), execsKey(e.prefix, account)).Int()
	if err == redis.Nil {
		return 0
	}
	require.NoError(t, err)
	return n
}

// cancelled returns why replica's handler for account saw its context
// cancelled, or "" if it did not.
func (e *pauseEnv) cancelled(t *testing.T, account, replica string) string {
	t.Helper()
	v, err := e.redis.Get(context.Background(), cancelledKey(e.prefix, account, replica)).Result()
	if err == redis.Nil {
		return ""
	}
	require.NoError(t, err)
	return v
}

func (e *pauseEnv) state(t *testing.T, key string) idempotency.Entry {
	t.Helper()
	en, err := e.store.Lookup(context.Background(), idempotency.StoreKey("", key))
	require.NoError(t, err)
	return en
}

// await polls cond every 10ms until it holds or within has passed, and
// reports whether it held.
func await(within time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// The bug of issue 9: a server paused (SIGSTOP) for 2.5s, past its 1s lease,
// in the middle of a 3s handler. The lease runs out in Redis meanwhile, and
// nobody takes the key. When the server resumes, its next renewal must take
// the key back (not give up on ErrNotOwner), its handler must go on
// uncancelled, and a duplicate sent 500ms later, to the same server or to
// another replica on the same Redis, must wait and replay the first
// execution's answer: the handler runs once. Three rounds per variant.
func TestPausedServerKeepsItsKey(t *testing.T) {
	if testing.Short() {
		t.Skip("starts and pauses server processes")
	}
	forEachMode(t, func(t *testing.T, m storeMode) {
		t.Parallel()
		for _, variant := range []string{"duplicate-to-same-server", "duplicate-to-other-replica"} {
			t.Run(variant, func(t *testing.T) {
				t.Parallel()
				env := newPauseEnv(t, m)
				a := startChild(t, env.mode, env.prefix, "A", "abort")
				dupTo := a
				if variant == "duplicate-to-other-replica" {
					dupTo = startChild(t, env.mode, env.prefix, "B", "abort")
				}
				for round := range 3 {
					pausedServerRound(t, env, a, dupTo, round)
				}
			})
		}
	})
}

func pausedServerRound(t *testing.T, env *pauseEnv, a, dupTo *child, round int) {
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()
	key := fmt.Sprintf("pause-%d", round)
	account := "acct-" + key

	firstDone := make(chan chargeResult, 1)
	go func() { firstDone <- chargeVia(ctx, a.client, key, account) }()
	require.True(t, await(eventually, func() bool { return env.execs(t, account) == 1 }), "round %d: the handler never started", round)
	time.Sleep(200 * time.Millisecond)

	a.pause(t)
	time.Sleep(2500 * time.Millisecond)
	// The pause outlasted the lease: Redis let the key go.
	assert.Equal(t, idempotency.Absent, env.state(t, key).State, "round %d: the lease did not run out during the pause", round)
	a.resume(t)
	resumed := time.Now()

	// The resumed server's renewal takes the key back under its token. It
	// is due at once; 2s is ample, and short enough that the handler is
	// still running when the duplicate comes if it never happens.
	if !await(2*time.Second, func() bool { return env.state(t, key).State == idempotency.Pending }) {
		t.Errorf("round %d: the resumed server did not take its key back", round)
	}
	time.Sleep(time.Until(resumed.Add(500 * time.Millisecond)))
	dup := chargeVia(ctx, dupTo.client, key, account)
	first := <-firstDone

	ok := assert.Equal(t, 1, env.execs(t, account), "round %d: executions", round)
	ok = assert.Empty(t, env.cancelled(t, account, a.name), "round %d: the paused handler was cancelled though nobody took its key", round) && ok
	ok = assert.NoError(t, first.err, "round %d: first call", round) && ok
	ok = assert.NoError(t, dup.err, "round %d: duplicate", round) && ok
	ok = assert.True(t, dup.replayed, "round %d: the duplicate was not answered from the first execution", round) && ok
	ok = assert.True(t, proto.Equal(first.resp, dup.resp), "round %d: answers differ: %v and %v", round, first.resp, dup.resp) && ok
	assert.False(t, first.replayed, "round %d", round)
	assert.Equal(t, []string{"A"}, dup.header.Get("charged-by"), "round %d", round)
	if dupTo != a {
		assert.Empty(t, env.cancelled(t, account, dupTo.name), "round %d", round)
	}
	assert.Equal(t, idempotency.Completed, env.state(t, key).State, "round %d", round)
	require.True(t, ok, "round %d failed; later rounds would repeat it", round)
}

// Replica A is paused until its lease has run out and replica B, given a
// duplicate, has taken the key and runs the call. When A resumes, its
// renewal finds the key taken: A's handler context is cancelled with cause
// ErrLeaseLost, which its Execution reports too. A's handler returns its
// response anyway (it was past its side effect): A's caller gets it, but
// the store keeps B's outcome, which every later duplicate replays.
func TestPausedReplicaLosesLeaseToAnother(t *testing.T) {
	if testing.Short() {
		t.Skip("starts and pauses server processes")
	}
	t.Parallel()
	forEachMode(t, func(t *testing.T, m storeMode) {
		t.Parallel()
		pausedReplicaLosesLease(t, m)
	})
}

func pausedReplicaLosesLease(t *testing.T, m storeMode) {
	env := newPauseEnv(t, m)
	a := startChild(t, env.mode, env.prefix, "A", "finish")
	b := startChild(t, env.mode, env.prefix, "B", "finish")
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()
	const key, account = "lost", "acct-lost"

	firstDone := make(chan chargeResult, 1)
	go func() { firstDone <- chargeVia(ctx, a.client, key, account) }()
	require.True(t, await(eventually, func() bool { return env.execs(t, account) == 1 }), "A's handler never started")
	time.Sleep(200 * time.Millisecond)
	a.pause(t)
	require.True(t, await(eventually, func() bool { return env.state(t, key).State == idempotency.Absent }), "A's lease never ran out")

	dupDone := make(chan chargeResult, 1)
	go func() { dupDone <- chargeVia(ctx, b.client, key, account) }()
	require.True(t, await(eventually, func() bool { return env.execs(t, account) == 2 }), "B never took the key over")
	taken := env.state(t, key)
	require.Equal(t, idempotency.Pending, taken.State)
	a.resume(t)

	first := <-firstDone
	require.NoError(t, first.err, "A's caller gets A's real outcome")
	assert.False(t, first.replayed)
	assert.Equal(t, []string{"A"}, first.header.Get("charged-by"))
	why := env.cancelled(t, account, "A")
	assert.Contains(t, why, "causeIsLeaseLost=true", "A's handler context: %s", why)
	assert.Contains(t, why, "execErrIsLeaseLost=true", "A's Execution.Err: %s", why)
	// A's outcome did not replace B's claim.
	if now := env.state(t, key); now.State == idempotency.Pending {
		assert.Equal(t, taken.Token, now.Token, "A's Complete or renewal replaced B's claim")
	}

	dup := <-dupDone
	require.NoError(t, dup.err)
	assert.False(t, dup.replayed)
	assert.Equal(t, []string{"B"}, dup.header.Get("charged-by"))
	assert.Empty(t, env.cancelled(t, account, "B"), "B's handler was cancelled")

	for _, r := range []*child{a, b} {
		later := chargeVia(ctx, r.client, key, account)
		require.NoError(t, later.err, "replay on %s", r.name)
		assert.True(t, later.replayed, "replay on %s", r.name)
		assert.True(t, proto.Equal(dup.resp, later.resp), "replay on %s: got %v, want B's %v", r.name, later.resp, dup.resp)
		assert.Equal(t, []string{"B"}, later.header.Get("charged-by"), "replay on %s", r.name)
	}
	assert.Equal(t, 2, env.execs(t, account), "A ran, then B after A's lease ran out; nobody else")
}
