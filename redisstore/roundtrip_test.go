package redisstore_test

import (
	"context"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The targets of the Redis store: a replay is one round trip, a first
// execution two (Reserve and Complete). Each command through the hook is one
// round trip, as the plain store sends no pipelines and the auto-pipelined
// one, with one caller, a pipeline of one command each time (which the test
// tells from a plain command by its context).
func TestRoundTrips(t *testing.T) { forEachMode(t, testRoundTrips) }

func testRoundTrips(t *testing.T, m storeMode) {
	ctx := callerContext()
	counter := &commandCounter{}
	c := newClient(t)
	c.AddHook(counter)
	s := m.store(t, c, testPrefix(t, c))

	// Load every script once, so that no NOSCRIPT fallback is counted.
	_, err := s.Reserve(ctx, "warm", claim("t"))
	require.NoError(t, err)
	require.NoError(t, s.Renew(ctx, "warm", idempotency.Claim{Token: "t", Lease: time.Minute}))
	require.NoError(t, s.Release(ctx, "warm", "t"))
	_, err = s.Reserve(ctx, "warm", claim("t"))
	require.NoError(t, err)
	require.NoError(t, s.Complete(ctx, "warm", "t", []byte("r"), time.Hour))
	_, err = s.Lookup(ctx, "warm")
	require.NoError(t, err)

	count := func(f func()) int64 {
		before := counter.commands()
		f()
		return counter.commands() - before
	}
	assert.Equal(t, int64(2), count(func() {
		e, err := s.Reserve(ctx, "first", claim("t"))
		require.NoError(t, err)
		require.Equal(t, idempotency.Acquired, e.State)
		require.NoError(t, s.Complete(ctx, "first", "t", []byte("outcome"), time.Hour))
	}), "round trips of a first execution")
	assert.Equal(t, int64(1), count(func() {
		e, err := s.Reserve(ctx, "first", claim("u"))
		require.NoError(t, err)
		require.Equal(t, idempotency.Completed, e.State)
		require.Equal(t, []byte("outcome"), e.Record)
	}), "round trips of a replay")
	assert.Equal(t, int64(1), count(func() {
		_, err := s.Reserve(ctx, "pending", claim("t"))
		require.NoError(t, err)
	}))
	assert.Equal(t, int64(1), count(func() { require.NoError(t, s.Renew(ctx, "pending", idempotency.Claim{Token: "t", Lease: time.Minute})) }))
	assert.Equal(t, int64(1), count(func() {
		e, err := s.Reserve(ctx, "pending", claim("u"))
		require.NoError(t, err)
		require.Equal(t, idempotency.Pending, e.State)
	}))
	assert.Equal(t, int64(1), count(func() { require.NoError(t, s.Release(ctx, "pending", "t")) }))
	assert.Equal(t, int64(1), count(func() {
		_, err := s.Lookup(ctx, "pending")
		require.NoError(t, err)
	}))
	assert.Equal(t, 0, int(counter.count("eval")), "a script was sent in full after warm-up")
	if len(m.opts) == 0 {
		assert.Equal(t, counter.commands(), counter.direct.Load(), "the plain store sent a command on another context than the caller's")
	} else {
		assert.Zero(t, counter.direct.Load(), "the auto-pipelined store sent a command on the caller's context, so not through the pipeliner")
	}
}

// benchClient returns a client whose pool does not throttle 64 goroutines.
func benchClient(b *testing.B) *redis.Client {
	return newClient(b, func(o *redis.Options) { o.PoolSize = 128 })
}

// runBench runs op b.N times, either in one goroutine or in 64 (whatever
// GOMAXPROCS is), and reports the round trips per op.
func runBench(b *testing.B, goroutines int, counter *commandCounter, op func(i int64)) {
	var seq atomic.Int64
	// Scripts only: new connections also send their handshake (HELLO,
	// CLIENT SETINFO) through the hook, which is not the store's cost.
	scripts := func() int64 { return counter.count("evalsha") + counter.count("eval") }
	before := scripts()
	b.ReportAllocs()
	b.ResetTimer()
	if goroutines == 1 {
		for range b.N {
			op(seq.Add(1))
		}
	} else {
		b.SetParallelism(max(1, goroutines/runtime.GOMAXPROCS(0)))
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				op(seq.Add(1))
			}
		})
	}
	b.StopTimer()
	b.ReportMetric(float64(scripts()-before)/float64(b.N), "roundtrips/op")
}

// BenchmarkFirstExecution is Reserve and Complete of a new key, as an
// interceptor does for a call it runs.
func BenchmarkFirstExecution(b *testing.B) {
	for _, g := range []int{1, 64} {
		b.Run("goroutines="+strconv.Itoa(g), func(b *testing.B) {
			ctx := context.Background()
			counter := &commandCounter{}
			c := benchClient(b)
			c.AddHook(counter)
			s := newStore(b, c, testPrefix(b, c))
			record := make([]byte, 256)
			warm(b, s)
			runBench(b, g, counter, func(i int64) {
				key := strconv.FormatInt(i, 10)
				tok := "tok-" + key
				e, err := s.Reserve(ctx, key, idempotency.Claim{Token: tok, Lease: time.Minute})
				if err != nil || e.State != idempotency.Acquired {
					b.Fatalf("Reserve: %v %v", e.State, err)
				}
				// A short retention keeps the benchmark's keys from piling up.
				if err := s.Complete(ctx, key, tok, record, time.Minute); err != nil {
					b.Fatal(err)
				}
			})
		})
	}
}

// BenchmarkReplay is Reserve of a completed key: what a duplicate costs.
func BenchmarkReplay(b *testing.B) {
	for _, g := range []int{1, 64} {
		b.Run("goroutines="+strconv.Itoa(g), func(b *testing.B) {
			ctx := context.Background()
			counter := &commandCounter{}
			c := benchClient(b)
			c.AddHook(counter)
			s := newStore(b, c, testPrefix(b, c))
			record := make([]byte, 256)
			const keys = 1024
			for i := range keys {
				key := strconv.Itoa(i)
				if _, err := s.Reserve(ctx, key, idempotency.Claim{Token: "t", Lease: time.Minute}); err != nil {
					b.Fatal(err)
				}
				if err := s.Complete(ctx, key, "t", record, time.Hour); err != nil {
					b.Fatal(err)
				}
			}
			runBench(b, g, counter, func(i int64) {
				e, err := s.Reserve(ctx, strconv.FormatInt(i%keys, 10), idempotency.Claim{Token: "u", Lease: time.Minute})
				if err != nil || e.State != idempotency.Completed {
					b.Fatalf("Reserve: %v %v", e.State, err)
				}
			})
		})
	}
}

func warm(b *testing.B, s *redisstore.Store) {
	ctx := context.Background()
	if _, err := s.Reserve(ctx, "warm", idempotency.Claim{Token: "t", Lease: time.Minute}); err != nil {
		b.Fatal(err)
	}
	if err := s.Complete(ctx, "warm", "t", nil, time.Minute); err != nil {
		b.Fatal(err)
	}
}
