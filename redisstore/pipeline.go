package redisstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/grpcidem/idempotency"
	"github.com/redis/go-redis/v9"
)

// WithAutoPipelining makes the Store send its scripts through go-redis's
// automatic pipelining (the AutoPipeliner that the client's AutoPipeline
// method returns): the scripts of concurrent calls are written to Redis
// together, as one pipeline, and share its round trips. Each operation is
// still one script on one key, so what the Store guarantees does not change
// (a Reserve is atomic and one command, a Complete checks its owner, waiters
// are notified); only how commands reach Redis does.
//
// It pays with many concurrent calls on one replica, where Redis and the
// client spend less per command in a batch than alone: with 64 callers,
// first executions and replays are faster by the factors in
// docs/benchmarks.md. With few callers a command waits for the pipeliner's
// goroutine and gains no company, and calls are slower than without it.
//
// How it behaves under failures, as exercised by the Store's tests:
//   - A command is not sent if the caller's context has ended before it is
//     queued. Once queued, it runs with its batch, whatever the context:
//     its wait is bounded by the client's ReadTimeout and WriteTimeout (and
//     retries), not by the caller's deadline. The interceptors bound their
//     store calls themselves, and release a key whose Reserve failed, as
//     without this option.
//   - A connection error fails, or retries (Options.MaxRetries), every command
//     of the batch at once. The Store's scripts are safe to run twice (see
//     scripts.go), so a retried batch is harmless; a failed one is a failed
//     call to each caller: fail-closed, as without this option.
//   - On a Redis Cluster, a batch is split by node, and MOVED and ASK replies
//     are followed as for a plain pipeline. While a master is down, the
//     commands for its slots wait in the pipeliner until a replica takes
//     over (seconds), where without this option they fail at once.
//   - A script Redis does not have (NOSCRIPT, after a restart or a failover)
//     is sent in full, as without this option.
//   - Pub/sub (the waiters' subscriber) and Health use the client itself.
//
// The client's Options.AutoPipelineOptions (ClusterOptions for a cluster)
// tune the pipeliner, as go-redis documents; the Store's tests run with the
// defaults. A MaxQueuedCommands limit makes a call that finds the queue full
// fail with redis.ErrAutoPipelineQueueFull, and so fail closed.
//
// The client passed to New must be a *redis.Client (which a sentinel failover
// client is) or a *redis.ClusterClient. The AutoPipeliner is the client's
// own, shared by everything that uses the client's AutoPipeline: the Store
// closes it in Close (which also flushes what it holds), and the Store, and
// any other Store on the same client, gets a new one from the client when it
// finds it closed. Code of your own that kept the AutoPipeliner of the same
// client must get it again after a Store closes.
//
// It cannot be combined with WithReplicaAcks, whose WAIT must follow each
// write on the write's own connection: New returns an error.
//
// go-redis marks automatic pipelining as experimental: its API and behaviour
// may change in a minor release of go-redis.
func WithAutoPipelining() Option {
	return func(o *options) { o.autoPipe = true }
}

// A pipeliner is the Store's handle on its client's AutoPipeliner.
type pipeliner struct {
	get func() (*redis.AutoPipeliner, error) // the client's AutoPipeline
	cur atomic.Pointer[redis.AutoPipeliner]

	mu     sync.Mutex // serializes replacing cur, and closing
	closed bool
}

func newPipeliner(client redis.UniversalClient) (*pipeliner, error) {
	p := &pipeliner{}
	switch c := client.(type) {
	case *redis.Client:
		p.get = c.AutoPipeline
	case *redis.ClusterClient:
		p.get = c.AutoPipeline
	default:
		return nil, fmt.Errorf("redisstore: WithAutoPipelining needs a *redis.Client or a *redis.ClusterClient, got %T", client)
	}
	ap, err := p.get()
	if err != nil {
		return nil, fmt.Errorf("redisstore: WithAutoPipelining: %w", err)
	}
	p.cur.Store(ap)
	return p, nil
}

// run runs script on key rk through the pipeliner. A context that has ended
// sends nothing, as with a plain client (which checks it before taking a
// connection; the pipeliner would not). A pipeliner closed by someone
// else (another Store on the client, or the client's owner) refuses the
// command before sending it; then it is sent again through the client's new
// pipeliner.
func (p *pipeliner) run(ctx context.Context, script *redis.Script, rk string, args ...any) *redis.Cmd {
	if err := ctx.Err(); err != nil {
		cmd := redis.NewCmd(ctx)
		cmd.SetErr(err)
		return cmd
	}
	ap := p.cur.Load()
	cmd := script.Run(ctx, ap, []string{rk}, args...)
	if errors.Is(cmd.Err(), redis.ErrClosed) {
		next, storeClosed := p.replace(ap)
		switch {
		case storeClosed:
			cmd.SetErr(idempotency.ErrClosed)
		case next != nil:
			cmd = script.Run(ctx, next, []string{rk}, args...)
		}
	}
	return cmd
}

// replace returns the pipeliner to use instead of old, which refused a
// command as closed, or nil if there is none: the Store is closed (then
// storeClosed is true), or so is the client.
func (p *pipeliner) replace(old *redis.AutoPipeliner) (_ *redis.AutoPipeliner, storeClosed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, true
	}
	if cur := p.cur.Load(); cur != old {
		return cur, false // replaced meanwhile
	}
	if !old.IsClosed() {
		return nil, false // the client's pool is closed, not the pipeliner
	}
	ap, err := p.get()
	if err != nil {
		return nil, false
	}
	p.cur.Store(ap)
	return ap, false
}

// close closes the current pipeliner, and waits until it has flushed the
// commands it held (whoever closed it).
func (p *pipeliner) close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	ap := p.cur.Load()
	err := ap.Close()
	if err == nil {
		err = ap.WaitClosed()
	}
	if err != nil && !errors.Is(err, redis.ErrClosed) {
		return fmt.Errorf("redisstore: closing the auto-pipeliner: %w", err)
	}
	return nil
}
