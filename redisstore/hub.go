package redisstore

import (
	"context"
	"errors"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// A hub is a Store's one subscriber connection, shared by all its waiters.
// It subscribes to a key's channel while at least one waiter waits on the
// key, and hands each message to the waiters of its channel.
//
// A waiter must know when its SUBSCRIBE has taken effect, since only then is
// a later PUBLISH sure to reach it. The hub writes a PING with a sequence
// number after each SUBSCRIBE: Redis answers commands on a connection in
// order, so the PONG of number n means that everything written before it has
// taken effect.
//
// The hub owns its PubSub outright. When the connection fails, or stays
// silent past a health check, the hub's goroutine replaces the PubSub with a
// new one subscribed to every channel in use, and once that has taken effect
// tells every waiter to re-check its key: what was published in between is
// lost.
type hub struct {
	client      redis.UniversalClient
	healthCheck time.Duration

	ctx     context.Context // ends at close
	cancel  context.CancelFunc
	closing chan struct{} // closed by close, for waiters
	done    chan struct{} // closed when run returns

	mu       sync.Mutex
	ps       *redis.PubSub // nil until the first connect
	broken   bool          // ps failed; run is replacing it
	closed   bool
	chans    map[string]*subscription
	barriers []barrier // ascending seq
	seq      uint64    // last PING sequence number written
	resetSeq uint64    // PING after the last reconnect, 0 once answered
}

// A subscription is one channel the hub listens on, and its waiters.
type subscription struct {
	waiters map[*waiter]struct{}
	ready   chan struct{} // closed once SUBSCRIBE has taken effect
	isReady bool
}

// A barrier is a PING whose PONG makes a subscription ready.
type barrier struct {
	seq uint64
	sub *subscription
}

// A waiter is one Wait call.
type waiter struct {
	channel string
	token   string
	sub     *subscription
	// signal has room for one wake-up: the owner's lease ended (see
	// ended), or the subscriber reconnected and the key must be checked.
	signal chan struct{}
	ended  atomic.Bool
}

func newHub(client redis.UniversalClient, healthCheck time.Duration) *hub {
	ctx, cancel := context.WithCancel(context.Background())
	h := &hub{
		client:      client,
		healthCheck: healthCheck,
		ctx:         ctx,
		cancel:      cancel,
		closing:     make(chan struct{}),
		done:        make(chan struct{}),
		chans:       make(map[string]*subscription),
	}
	h.broken = true // until run connects
	go h.run()
	return h
}

// add registers a waiter on channel for the lease of token, subscribing the
// channel if it is new.
func (h *hub) add(channel, token string) *waiter {
	w := &waiter{channel: channel, token: token, signal: make(chan struct{}, 1)}
	h.mu.Lock()
	defer h.mu.Unlock()
	sub := h.chans[channel]
	if sub == nil {
		sub = &subscription{waiters: make(map[*waiter]struct{}), ready: make(chan struct{})}
		h.chans[channel] = sub
		if !h.broken && !h.closed {
			// While the hub is broken, the reconnect subscribes every
			// channel in h.chans, this one included, and readies them.
			err := h.ps.Subscribe(h.ctx, channel)
			if err == nil {
				err = h.pingLocked(sub)
			}
			if err != nil {
				h.breakLocked()
			}
		}
	}
	sub.waiters[w] = struct{}{}
	w.sub = sub
	return w
}

// remove unregisters w, unsubscribing its channel if it was the last waiter.
func (h *hub) remove(w *waiter) {
	h.mu.Lock()
	defer h.mu.Unlock()
	sub := w.sub
	delete(sub.waiters, w)
	if len(sub.waiters) > 0 || h.chans[w.channel] != sub {
		return
	}
	delete(h.chans, w.channel)
	if !h.broken && !h.closed {
		if err := h.ps.Unsubscribe(h.ctx, w.channel); err != nil {
			h.breakLocked()
		}
	}
}

// pingLocked writes a PING whose PONG readies sub (if not nil).
func (h *hub) pingLocked(sub *subscription) error {
	h.seq++
	if sub != nil {
		h.barriers = append(h.barriers, barrier{h.seq, sub})
	}
	return h.ps.Ping(h.ctx, strconv.FormatUint(h.seq, 10))
}

// breakLocked gives up on the current PubSub: closing it ends the blocked
// receive in run, which then reconnects.
func (h *hub) breakLocked() {
	if h.broken {
		return
	}
	h.broken = true
	_ = h.ps.Close()
}

func (h *hub) close() {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return
	}
	h.closed = true
	close(h.closing)
	h.cancel()
	if h.ps != nil {
		_ = h.ps.Close()
	}
	h.mu.Unlock()
	<-h.done
}

// run keeps the hub connected until close.
func (h *hub) run() {
	defer close(h.done)
	const minBackoff, maxBackoff = 50 * time.Millisecond, 5 * time.Second
	backoff := minBackoff
	for {
		ps, ok := h.connect()
		if h.ctx.Err() != nil {
			return
		}
		if !ok {
			select {
			case <-time.After(backoff):
			case <-h.ctx.Done():
				return
			}
			backoff = min(2*backoff, maxBackoff)
			continue
		}
		backoff = minBackoff
		h.receive(ps)
		if h.ctx.Err() != nil {
			return
		}
	}
}

// connect replaces the hub's PubSub with a new one subscribed to every
// channel in use, followed by a PING whose PONG readies them all.
func (h *hub) connect() (*redis.PubSub, bool) {
	ps := h.client.Subscribe(h.ctx)
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		_ = ps.Close()
		return nil, false
	}
	old := h.ps
	h.ps, h.broken = ps, false
	channels := make([]string, 0, len(h.chans))
	for c := range h.chans {
		channels = append(channels, c)
	}
	var err error
	if len(channels) > 0 {
		err = ps.Subscribe(h.ctx, channels...)
	}
	if err == nil {
		err = h.pingLocked(nil)
		h.resetSeq = h.seq
	}
	if err != nil {
		h.breakLocked()
	}
	h.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
	return ps, err == nil
}

// receive reads ps until it fails.
func (h *hub) receive(ps *redis.PubSub) {
	pinged := false
	for {
		msg, err := ps.ReceiveTimeout(h.ctx, h.healthCheck)
		if err != nil {
			if h.ctx.Err() != nil {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && !pinged {
				// Silence may be a dead peer: ask, and reconnect if
				// the answer does not come within another interval.
				pinged = true
				h.mu.Lock()
				if h.ps != ps || h.broken {
					h.mu.Unlock()
					return
				}
				if err := h.pingLocked(nil); err != nil {
					h.breakLocked()
				}
				h.mu.Unlock()
				continue
			}
			h.mu.Lock()
			if h.ps == ps {
				h.breakLocked()
			}
			h.mu.Unlock()
			return
		}
		pinged = false
		switch m := msg.(type) {
		case *redis.Message:
			h.deliver(m.Channel, m.Payload)
		case *redis.Pong:
			if seq, err := strconv.ParseUint(m.Payload, 10, 64); err == nil {
				h.pong(seq)
			}
		}
	}
}

// deliver wakes the waiters of channel that wait on the lease of token.
func (h *hub) deliver(channel, token string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	sub := h.chans[channel]
	if sub == nil {
		return
	}
	for w := range sub.waiters {
		if w.token == token {
			w.ended.Store(true)
			w.wake()
		}
	}
}

// pong readies the subscriptions whose PING has been answered, and after a
// reconnect, every subscription, and has every waiter re-check its key.
func (h *hub) pong(seq uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	i := 0
	for ; i < len(h.barriers) && h.barriers[i].seq <= seq; i++ {
		h.barriers[i].sub.markReady()
		h.barriers[i] = barrier{}
	}
	h.barriers = h.barriers[i:]
	if h.resetSeq == 0 || seq < h.resetSeq {
		return
	}
	h.resetSeq = 0
	for _, sub := range h.chans {
		sub.markReady()
		for w := range sub.waiters {
			w.wake()
		}
	}
}

func (s *subscription) markReady() {
	if !s.isReady {
		s.isReady = true
		close(s.ready)
	}
}

func (w *waiter) wake() {
	select {
	case w.signal <- struct{}{}:
	default:
	}
}
