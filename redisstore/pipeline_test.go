package redisstore_test

import (
	"context"
	"crypto/sha1"
	"errors"
	"fmt"
	"strconv"
	"strings"
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

// The tests of what WithAutoPipelining adds to what can go wrong; the rest
// of the suite runs with it too (see storeModes).

func TestAutoPipeliningRejectsBadInput(t *testing.T) {
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": redisAddr()}})
	defer ring.Close()
	_, err := redisstore.New(ring, redisstore.WithAutoPipelining())
	require.ErrorContains(t, err, "*redis.Ring")

	c := redis.NewClient(&redis.Options{Addr: redisAddr()})
	_, err = redisstore.New(c, redisstore.WithAutoPipelining(), redisstore.WithReplicaAcks(1, time.Second))
	require.ErrorContains(t, err, "WithReplicaAcks")

	require.NoError(t, c.Close())
	_, err = redisstore.New(c, redisstore.WithAutoPipelining())
	require.ErrorIs(t, err, redis.ErrClosed)
}

// Stores on one client share its AutoPipeliner. Closing one closes it; the
// others go on through the client's next one, and so does the client's owner.
func TestAutoPipelinerSharedByStores(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, c)
	a, err := redisstore.New(c, pipelinedMode.with(redisstore.WithPrefix(prefix))...)
	require.NoError(t, err)
	b := pipelinedMode.store(t, c, prefix)
	mine, err := c.AutoPipeline()
	require.NoError(t, err)

	_, err = a.Reserve(ctx, "a", claim("t"))
	require.NoError(t, err)
	require.NoError(t, a.Close())
	assert.True(t, mine.IsClosed(), "Close left the client's AutoPipeliner open")

	_, err = b.Reserve(ctx, "b", claim("t"))
	require.NoError(t, err, "a Store failed once another on its client closed")
	require.NoError(t, b.Complete(ctx, "b", "t", []byte("r"), time.Hour))
	e, err := b.Lookup(ctx, "a")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)

	again, err := c.AutoPipeline()
	require.NoError(t, err)
	require.NoError(t, again.Ping(ctx).Err())
}

// A Store that goes on using the client's AutoPipeliner after its owner
// closed it, and after the client itself is closed, fails closed.
func TestAutoPipelinerClosedUnderneath(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	prefix := testPrefix(t, newClient(t))
	s := pipelinedMode.store(t, c, prefix)
	ap, err := c.AutoPipeline()
	require.NoError(t, err)
	require.NoError(t, ap.Close())
	_, err = s.Reserve(ctx, "k", claim("t"))
	require.NoError(t, err, "the Store did not take the client's new AutoPipeliner")

	require.NoError(t, c.Close())
	_, err = s.Reserve(ctx, "k2", claim("t"))
	require.ErrorIs(t, err, redis.ErrClosed)
}

// A context that ended before the command was queued sends nothing: the key
// is not taken.
func TestAutoPipelinedEndedContextSendsNothing(t *testing.T) {
	c := newClient(t)
	prefix := testPrefix(t, c)
	s := pipelinedMode.store(t, c, prefix)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := s.Reserve(ctx, "k", claim("t"))
	require.ErrorIs(t, err, context.Canceled)
	assert.Empty(t, redisKeys(t, c, prefix))
}

// A script that Redis lost (after a restart or a failover) is sent in full,
// by concurrent callers at once, through the pipeliner as without it. The
// loss is played by a hook (SCRIPT FLUSH would disturb whoever else uses the
// test Redis): until a script has been sent in full, its EVALSHA gets
// NOSCRIPT without reaching Redis.
func TestNoScriptUnderConcurrency(t *testing.T) { forEachMode(t, testNoScriptUnderConcurrency) }

func testNoScriptUnderConcurrency(t *testing.T, m storeMode) {
	ctx := context.Background()
	c := newClient(t)
	lost := &scriptLoss{}
	c.AddHook(lost)
	prefix := testPrefix(t, c)
	s := m.store(t, c, prefix)

	var wg sync.WaitGroup
	errs := make([]error, 32)
	for i := range errs {
		wg.Go(func() {
			key := "k" + strconv.Itoa(i)
			e, err := s.Reserve(ctx, key, claim("t"))
			if err == nil && e.State != idempotency.Acquired {
				err = errors.New("not acquired: " + e.State.String())
			}
			if err == nil {
				err = s.Complete(ctx, key, "t", []byte("r"), time.Hour)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		assert.NoError(t, err, "caller %d", i)
	}
	assert.Positive(t, lost.refused.Load(), "no EVALSHA was refused; the test proves nothing")
}

// scriptLoss is a redis.Hook that plays a Redis whose script cache is empty:
// an EVALSHA of a script that no EVAL has sent yet fails with NOSCRIPT,
// without being sent.
type scriptLoss struct {
	mu      sync.Mutex
	loaded  map[string]bool // script SHA1 -> sent in full
	refused atomic.Int64
}

type noScriptError struct{}

func (noScriptError) Error() string { return "NOSCRIPT No matching script. Please use EVAL." }
func (noScriptError) RedisError()   {}

// refuse fails cmd if it is an EVALSHA of a script not loaded yet, and
// notes the scripts that an EVAL loads.
func (h *scriptLoss) refuse(cmd redis.Cmder) bool {
	args := cmd.Args()
	if len(args) < 2 {
		return false
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.loaded == nil {
		h.loaded = map[string]bool{}
	}
	switch strings.ToLower(cmd.Name()) {
	case "eval":
		script, _ := args[1].(string)
		h.loaded[fmt.Sprintf("%x", sha1.Sum([]byte(script)))] = true
	case "evalsha":
		sha, _ := args[1].(string)
		if !h.loaded[sha] {
			h.refused.Add(1)
			cmd.SetErr(noScriptError{})
			return true
		}
	}
	return false
}

func (h *scriptLoss) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *scriptLoss) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.refuse(cmd) {
			return cmd.Err()
		}
		return next(ctx, cmd)
	}
}

func (h *scriptLoss) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		var send []redis.Cmder
		for _, cmd := range cmds {
			if !h.refuse(cmd) {
				send = append(send, cmd)
			}
		}
		if len(send) == 0 {
			return nil
		}
		return next(ctx, send)
	}
}

// With a MaxQueuedCommands limit, a call that finds the queue full fails
// with redis.ErrAutoPipelineQueueFull without sending anything: the calls
// that fail hold no key.
func TestAutoPipelineQueueFull(t *testing.T) {
	ctx := context.Background()
	// Replies come 50ms late, so that the queue stays full.
	px := startProxy(t, redisAddr(), 50*time.Millisecond)
	c := newClient(t, func(o *redis.Options) {
		o.Addr = px.addr()
		o.AutoPipelineOptions = &redis.AutoPipelineOptions{MaxQueuedCommands: 4}
	})
	admin := newClient(t)
	prefix := testPrefix(t, admin)
	s := pipelinedMode.store(t, c, prefix)
	_, err := s.Reserve(ctx, "warm", claim("t"))
	require.NoError(t, err)

	const callers = 32
	errs := make([]error, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Go(func() { _, errs[i] = s.Reserve(ctx, "k"+strconv.Itoa(i), claim("t")) })
	}
	wg.Wait()
	other := newStore(t, admin, prefix)
	full := 0
	for i, err := range errs {
		e, lerr := other.Lookup(ctx, "k"+strconv.Itoa(i))
		require.NoError(t, lerr)
		if err != nil {
			require.ErrorIs(t, err, redis.ErrAutoPipelineQueueFull, "caller %d", i)
			assert.Equal(t, idempotency.Absent, e.State, "a call refused for a full queue took its key")
			full++
		} else {
			assert.Equal(t, idempotency.Pending, e.State)
		}
	}
	assert.Positive(t, full, "no call found the queue full; the test proves nothing")
	t.Logf("%d of %d calls found the queue full", full, callers)
}

// Redis becomes unreachable while a batch of Reserves is in flight: every
// call of the batch fails together (go-redis retries nothing here), though
// Redis may have run some of them. Each failed caller's retry with its own
// token then acquires its key, whether or not the failed attempt had taken
// it: a failed batch costs its callers an error, and nothing else.
func TestAutoPipelinedBatchFailsTogether(t *testing.T) {
	ctx := context.Background()
	admin := newClient(t)
	prefix := testPrefix(t, admin)
	const delay = 300 * time.Millisecond
	px := startProxy(t, redisAddr(), delay)
	s := pipelinedMode.store(t, proxiedClient(t, px), prefix)
	_, err := s.Reserve(ctx, "warm", claim("t"))
	require.NoError(t, err)

	// A first command is in flight alone; the callers' Reserves queue
	// behind it, and go together once it is answered, delay later. The
	// connection is cut while their batch waits for its answers.
	start := time.Now()
	blocker := make(chan error, 1)
	go func() {
		_, err := s.Lookup(ctx, "blocker")
		blocker <- err
	}()
	time.Sleep(delay / 10)
	const callers = 32
	errs := make([]error, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Go(func() { _, errs[i] = s.Reserve(ctx, "k"+strconv.Itoa(i), claim("t"+strconv.Itoa(i))) })
	}
	time.Sleep(time.Until(start.Add(delay * 3 / 2)))
	px.cut(0)
	wg.Wait()
	require.NoError(t, <-blocker, "the cut came before the first command was answered; the test proves nothing")

	other := newStore(t, admin, prefix)
	failed := 0
	for i, err := range errs {
		key, token := "k"+strconv.Itoa(i), "t"+strconv.Itoa(i)
		if err == nil {
			e, err := other.Lookup(ctx, key)
			require.NoError(t, err)
			assert.Equal(t, token, e.Token, "caller %d was answered, but does not hold its key", i)
			continue
		}
		failed++
		e, err := other.Reserve(ctx, key, claim(token))
		require.NoError(t, err)
		assert.Equal(t, idempotency.Acquired, e.State, "caller %d's retry", i)
	}
	t.Logf("%d of %d calls failed together", failed, callers)
	assert.Greater(t, failed, 1, "the cut failed no batch; the test proves nothing")
}
