package pgstore

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"sync"
	"time"
)

// notifyBatch bounds the keys one notifying statement carries.
const notifyBatch = 1000

// notifier sends the NOTIFYs that wake waiters, after the change they
// announce has committed, in batches, from one goroutine.
//
// Why not pg_notify inside Complete's own statement: a transaction that
// notifies takes one database-wide lock at commit and holds it until its
// commit record is flushed, so every Complete in the database would queue
// behind every other's disk flush. Here the change commits durably on its
// own, and the notification follows in a transaction that does not wait
// for the disk (a lost notification only delays waiters until their
// recheck), carrying every key that changed meanwhile.
type notifier struct {
	s       *Store
	mu      sync.Mutex
	pending map[string]struct{}
	kick    chan struct{}
}

func newNotifier(s *Store) *notifier {
	return &notifier{s: s, pending: make(map[string]struct{}), kick: make(chan struct{}, 1)}
}

// notifyPayload names key in notifications: NOTIFY payloads are limited to
// 8000 bytes and must be text, while keys are binary and of any length.
func notifyPayload(key string) string {
	h := sha256.Sum256([]byte(key))
	return hex.EncodeToString(h[:])
}

// add schedules a notification for key, which has just changed (committed).
func (n *notifier) add(key string) {
	n.mu.Lock()
	n.pending[notifyPayload(key)] = struct{}{}
	n.mu.Unlock()
	signal(n.kick)
}

func (n *notifier) take() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.pending) == 0 {
		return nil
	}
	batch := make([]string, 0, len(n.pending))
	for p := range n.pending {
		batch = append(batch, p)
		delete(n.pending, p)
		if len(batch) == notifyBatch {
			signal(n.kick) // more to send
			break
		}
	}
	return batch
}

func (n *notifier) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			// Changes committed just before Close still wake the
			// waiters of other replicas.
			fctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			for batch := n.take(); batch != nil && fctx.Err() == nil; batch = n.take() {
				n.send(fctx, batch)
			}
			cancel()
			return
		case <-n.kick:
		}
		if batch := n.take(); batch != nil {
			sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			n.send(sctx, batch)
			cancel()
		}
	}
}

func (n *notifier) send(ctx context.Context, batch []string) {
	_, err := n.s.pool.Exec(ctx, n.s.sql.notify, n.s.channel, batch)
	if err != nil && ctx.Err() == nil {
		n.s.opts.logger.Warn("pgstore: notifying waiters failed; they will see the change at their next recheck",
			"channel", n.s.channel, "keys", len(batch), "err", err)
	}
}
