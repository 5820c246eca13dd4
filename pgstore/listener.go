package pgstore

import (
	"context"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Intervals of the listening connection.
const (
	// listenPing: how long the connection may sit silent before it is
	// pinged. A connection dropped by a firewall without a word would
	// otherwise leave waiters on the recheck interval for good.
	listenPing = 30 * time.Second
	// listenBackoff bounds the wait between reconnection attempts.
	listenBackoffMin = 50 * time.Millisecond
	listenBackoffMax = 5 * time.Second
)

// listener is a Store's one LISTEN connection. It hands each notification,
// which names a key by its hash, to the waiters registered on that key.
type listener struct {
	s       *Store
	mu      sync.Mutex
	waiters map[string]map[*waiter]struct{}
	// closed is closed when the store closes, after the connection is gone.
	closed chan struct{}
}

type waiter struct {
	key string
	ch  chan struct{} // buffered: a wake-up is never lost, nor blocks
}

func newListener(s *Store) *listener {
	return &listener{s: s, waiters: make(map[string]map[*waiter]struct{}), closed: make(chan struct{})}
}

func (l *listener) register(key string) *waiter {
	w := &waiter{key: key, ch: make(chan struct{}, 1)}
	l.mu.Lock()
	defer l.mu.Unlock()
	set := l.waiters[key]
	if set == nil {
		set = make(map[*waiter]struct{})
		l.waiters[key] = set
	}
	set[w] = struct{}{}
	return w
}

func (l *listener) unregister(w *waiter) {
	l.mu.Lock()
	defer l.mu.Unlock()
	set := l.waiters[w.key]
	delete(set, w)
	if len(set) == 0 {
		delete(l.waiters, w.key)
	}
}

func (l *listener) wake(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for w := range l.waiters[key] {
		signal(w.ch)
	}
}

// wakeAll wakes every waiter, after a reconnection: notifications sent while
// the connection was down are lost, so every waiter looks at its key again.
func (l *listener) wakeAll() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, set := range l.waiters {
		for w := range set {
			signal(w.ch)
		}
	}
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// connect takes a connection out of the pool for good (so that the pool's
// connection hooks and tracers apply, and the pool does not count it) and
// listens on the store's channel.
func (l *listener) connect(ctx context.Context) (*pgx.Conn, error) {
	pc, err := l.s.pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	conn := pc.Hijack()
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{l.s.channel}.Sanitize()); err != nil {
		closeConn(conn)
		return nil, err
	}
	return conn, nil
}

func closeConn(conn *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	conn.Close(ctx)
}

// run dispatches notifications until ctx ends, reconnecting when the
// connection fails. conn is already listening.
func (l *listener) run(ctx context.Context, conn *pgx.Conn) {
	defer close(l.closed)
	logger := l.s.opts.logger
	for {
		err := l.dispatch(ctx, conn)
		closeConn(conn)
		if ctx.Err() != nil {
			return
		}
		logger.Warn("pgstore: listening connection lost; reconnecting", "channel", l.s.channel, "err", err)
		backoff := listenBackoffMin
		for {
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			conn, err = l.connect(ctx)
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				return
			}
			logger.Warn("pgstore: reconnecting the listening connection failed", "channel", l.s.channel, "err", err)
			backoff = min(2*backoff, listenBackoffMax)
		}
		logger.Info("pgstore: listening connection restored", "channel", l.s.channel)
		l.wakeAll()
	}
}

// dispatch hands out notifications until the connection fails or ctx ends.
func (l *listener) dispatch(ctx context.Context, conn *pgx.Conn) error {
	for {
		wctx, cancel := context.WithTimeout(ctx, listenPing)
		n, err := conn.WaitForNotification(wctx)
		timedOut := wctx.Err() != nil
		cancel()
		if n != nil {
			l.wake(n.Payload)
		}
		switch {
		case err == nil:
		case ctx.Err() != nil:
			return ctx.Err()
		case timedOut && !conn.IsClosed():
			pctx, cancel := context.WithTimeout(ctx, listenPing)
			err := conn.Ping(pctx)
			cancel()
			if err != nil {
				return err
			}
		default:
			return err
		}
	}
}
