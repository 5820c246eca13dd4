package redisstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/grpcidem/idempotency"
	"github.com/redis/go-redis/v9"
)

// WithReplicaAcks makes the writes that a failover must not lose wait until
// n replicas of the key's master have them, for at most timeout, before they
// count as done: a Reserve that takes a key, a Renew, and a Complete. Each
// sends its script and a WAIT n timeout in one pipeline, on one connection to
// the key's master (WAIT counts the replication of that connection's own
// writes), so a write costs no extra round trip, only the time the replicas
// take to acknowledge it.
//
// If fewer than n replicas acknowledge in time, the write stays on the
// master but the method fails: a Reserve's key is released by the
// interceptors and the caller gets Unavailable without the handler running;
// a Complete is retried within the store timeout, and if it never succeeds
// the key stays held until its lease runs out, as for any outcome the store
// could not save; a failed Renew is retried. So with n replicas required, a
// shard with fewer than n replicas in sync (one lost its replica, or a
// replica was just promoted and the old master has not rejoined) refuses new
// first executions and delays answers by up to the store timeout, until a
// replica is back: it trades availability for not losing answered records.
// Keep timeout well under the interceptors' store timeout (WithStoreTimeout)
// so that a Complete can be retried, and under the client's ReadTimeout.
//
// Replays and waits write nothing and never wait for replicas. n must be at
// least 1; the client passed to New must be a *redis.Client (which a sentinel
// failover client is) or a *redis.ClusterClient, since WAIT has to follow the
// write on the same connection. On a cluster these writes go through the
// node clients (ClusterClient.MasterForKey), so they are seen by hooks added
// with ClusterClient.OnNewNode, not by those added with AddHook.
//
// WAIT makes a write survive the failover to a replica that acknowledged it;
// it does not make it durable on disk. (WAITAOF, Redis 7.2 and later, would
// also wait for the AOF fsync.)
func WithReplicaAcks(n int, timeout time.Duration) Option {
	return func(o *options) {
		o.acks = n
		o.acksTimeout = timeout
	}
}

// replicaAcks runs the Store's lease and record writes followed by a WAIT on
// the same connection to the key's master.
type replicaAcks struct {
	cluster *redis.ClusterClient // or
	single  *redis.Client
	n       int
	timeout time.Duration
	ms      int64
}

func newReplicaAcks(client redis.UniversalClient, n int, timeout time.Duration) (*replicaAcks, error) {
	if n < 1 {
		return nil, fmt.Errorf("redisstore: WithReplicaAcks needs at least 1 replica to wait for, got %d", n)
	}
	if timeout <= 0 {
		return nil, fmt.Errorf("redisstore: WithReplicaAcks needs a timeout above zero, got %v (a WAIT without one blocks for ever)", timeout)
	}
	a := &replicaAcks{n: n, timeout: timeout, ms: int64((timeout + time.Millisecond - 1) / time.Millisecond)}
	var readTimeout time.Duration
	switch c := client.(type) {
	case *redis.ClusterClient:
		a.cluster = c
		readTimeout = c.Options().ReadTimeout
	case *redis.Client:
		a.single = c
		readTimeout = c.Options().ReadTimeout
	default:
		return nil, fmt.Errorf("redisstore: WithReplicaAcks needs a *redis.Client or a *redis.ClusterClient, got %T: WAIT must follow each write on the same connection to the key's master", client)
	}
	if readTimeout > 0 && timeout >= readTimeout {
		return nil, fmt.Errorf("redisstore: WithReplicaAcks timeout %v must be shorter than the Redis client's ReadTimeout %v, or the client gives up on the WAIT first", timeout, readTimeout)
	}
	return a, nil
}

// errTooFewAcks reports a write that too few replicas acknowledged in time.
var errTooFewAcks = errors.New("too few replicas acknowledged the write")

// run runs script on the master of key rk, then WAIT on the same connection.
// It returns the script's reply and how many replicas acknowledged
// everything the connection wrote; a WAIT that failed counts none.
//
// On a cluster, a failed script makes the client reload its slot map, since
// a MOVED or a master that is gone means the slots have moved (a failover);
// after a MOVED, which the script did not run under, it is run again on the
// node the MOVED names once the slot map does too.
func (a *replicaAcks) run(ctx context.Context, script *redis.Script, rk string, args ...any) (*redis.Cmd, int64, error) {
	for redirects := 0; ; redirects++ {
		node := a.single
		if a.cluster != nil {
			var err error
			if node, err = a.cluster.MasterForKey(ctx, rk); err != nil {
				return nil, 0, err
			}
		}
		cmd, wait := a.pipeline(ctx, node, script, rk, args)
		err := cmd.Err()
		if err == nil {
			acked, werr := wait.Int64()
			if werr != nil {
				acked = 0
			}
			return cmd, acked, nil
		}
		if a.cluster == nil {
			return nil, 0, err
		}
		a.cluster.ReloadState(ctx)
		addr, moved := redis.IsMovedError(err)
		if !moved || redirects == maxRedirects || !a.awaitMaster(ctx, rk, addr) {
			return nil, 0, err
		}
	}
}

// maxRedirects is how many MOVED replies run follows.
const maxRedirects = 2

// pipeline sends the script and WAIT in one pipeline on node.
func (a *replicaAcks) pipeline(ctx context.Context, node *redis.Client, script *redis.Script, rk string, args []any) (cmd, wait *redis.Cmd) {
	keys := []string{rk}
	send := func(eval func(context.Context, redis.Scripter, []string, ...any) *redis.Cmd) {
		// A failed pipeline fails its commands: their own errors say it all.
		_, _ = node.Pipelined(ctx, func(p redis.Pipeliner) error {
			cmd = eval(ctx, p, keys, args...)
			wait = p.Do(ctx, "WAIT", a.n, a.ms)
			return nil
		})
	}
	send(script.EvalSha)
	if redis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
		send(script.Eval)
	}
	return cmd, wait
}

// awaitMaster waits, for a second at most, until the cluster client's slot
// map names addr as the master of key rk.
func (a *replicaAcks) awaitMaster(ctx context.Context, rk, addr string) bool {
	deadline := time.Now().Add(time.Second)
	for {
		if node, err := a.cluster.MasterForKey(ctx, rk); err == nil && node.Options().Addr == addr {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		t := time.NewTimer(20 * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return false
		}
		a.cluster.ReloadState(ctx)
	}
}

// check turns a WAIT's count into an error when it is short.
func (a *replicaAcks) check(acked int64) error {
	if acked < int64(a.n) {
		return fmt.Errorf("%w: %d of %d within %v (WithReplicaAcks)", errTooFewAcks, acked, a.n, a.timeout)
	}
	return nil
}

// reserve runs reserveScript. A reply that took the key ({1}) needs the
// acknowledgements; one that found the key held wrote nothing, and does not.
func (a *replicaAcks) reserve(ctx context.Context, rk string, pending []byte, lease int64) ([]any, error) {
	cmd, acked, err := a.run(ctx, reserveScript, rk, pending, lease)
	if err != nil {
		return nil, err
	}
	res, err := cmd.Slice()
	if err != nil {
		return nil, err
	}
	if len(res) == 1 {
		if err := a.check(acked); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// renew runs renewScript, which writes whenever the key is the owner's.
func (a *replicaAcks) renew(ctx context.Context, rk, ow string, lease int64, pending []byte) error {
	cmd, acked, err := a.run(ctx, renewScript, rk, ow, lease, pending)
	if err != nil {
		return err
	}
	n, err := cmd.Int()
	if err != nil {
		return err
	}
	if n == 0 {
		return idempotency.ErrNotOwner
	}
	return a.check(acked)
}

// complete runs completeScript, asking it to write the record again if this
// owner had already stored it: the earlier attempt's WAIT may have failed,
// or been lost with its connection, and a WAIT only covers writes made
// before it on its own connection.
func (a *replicaAcks) complete(ctx context.Context, rk, ow string, value []byte, retention int64, token string) (int, error) {
	cmd, acked, err := a.run(ctx, completeScript, rk, ow, value, retention, token, "again")
	if err != nil {
		return 0, err
	}
	n, err := cmd.Int()
	if err != nil || n == 0 {
		return n, err
	}
	return n, a.check(acked)
}
