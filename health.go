package idempotency

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// A HealthChecker is a Store that can tell, cheaply, whether it can serve
// calls now: Health returns nil when it can, and why not otherwise. A Store
// need not implement it; the Server checks a Store that does not with a
// Lookup. boltstore reports whether its file takes writes (a bbolt file that
// cannot is refused first executions, although its reads work), redisstore
// and pgstore ping their server.
type HealthChecker interface {
	Health(ctx context.Context) error
}

// healthProbeKey is the key that a Server looks up to check a Store that is
// not a HealthChecker. Looking it up changes nothing, whoever uses it.
var healthProbeKey = StoreKey("", "idempotency-health-probe")

// DefaultHealthInterval is how often WatchHealth checks the store when it
// is given no interval.
const DefaultHealthInterval = time.Second

// health is what the Server's calls have seen of the store: the last store
// error, until a store call succeeds or a check of the store that began after
// the error passes.
type health struct {
	bad     atomic.Bool // err != nil, read by every call without locking
	mu      sync.Mutex
	err     error
	seq     uint64        // bumped by every store error a call saw
	changed chan struct{} // closed, and replaced, when err turns nil or non-nil
}

// storeFailedHealth records a store error seen by a call. An error about
// the call's own key says nothing of the store.
func (s *Server) storeFailedHealth(err error) {
	if errors.Is(err, ErrKeyTooLong) {
		return
	}
	h := &s.health
	h.mu.Lock()
	defer h.mu.Unlock()
	h.seq++
	was := h.err
	h.err = err
	if was == nil {
		h.bad.Store(true)
		h.signal()
	}
}

// storeServed records a store call that succeeded. It costs one atomic load
// while the store is healthy.
func (s *Server) storeServed() {
	if !s.health.bad.Load() {
		return
	}
	s.health.clear(nil)
}

// clear forgets the last store error, unless a call saw another since seq
// (nil: whatever it was).
func (h *health) clear(seq *uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err == nil || (seq != nil && h.seq != *seq) {
		return
	}
	h.err = nil
	h.bad.Store(false)
	h.signal()
}

// signal wakes the watchers; h.mu must be held.
func (h *health) signal() {
	if h.changed != nil {
		close(h.changed)
		h.changed = nil
	}
}

// watch returns a channel closed at the next change, and the current error.
func (h *health) watch() (<-chan struct{}, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.changed == nil {
		h.changed = make(chan struct{})
	}
	return h.changed, h.err
}

// ErrStoreUnhealthy is wrapped by the errors of Health and WatchHealth.
var ErrStoreUnhealthy = errors.New("idempotency: the store cannot serve")

// Health returns nil when the Server's store can serve calls, and otherwise
// an error that wraps ErrStoreUnhealthy and says why: the store's own check
// failed (HealthChecker, or a Lookup for a Store that is not one), or a call
// saw the store fail since the last store call that succeeded and the last
// check that passed. While it returns an error, new first executions are
// refused with Unavailable (fail-closed); replays of stored records may
// still work.
//
// With WithFailOpen, Health always returns nil: calls run without
// idempotency while the store fails, so the server keeps serving (the
// fail-open events, and idemotel's idempotency.server.fail_opens counter,
// say that it does).
func (s *Server) Health(ctx context.Context) error {
	_, err := s.checkHealth(ctx)
	return err
}

// checkHealth checks the store, and returns whether the store's own check
// passed and Health's answer.
func (s *Server) checkHealth(ctx context.Context) (passed bool, err error) {
	if s.o.failOpen {
		return true, nil
	}
	h := &s.health
	h.mu.Lock()
	seq := h.seq
	h.mu.Unlock()
	if hc, ok := s.store.(HealthChecker); ok {
		err = hc.Health(ctx)
	} else {
		_, err = s.store.Lookup(ctx, healthProbeKey)
	}
	if err != nil {
		return false, unhealthy(err)
	}
	// The store passed a check that began after the last error a call
	// saw: the store has recovered since.
	h.clear(&seq)
	h.mu.Lock()
	last := h.err
	h.mu.Unlock()
	if last != nil {
		return true, unhealthy(last)
	}
	return true, nil
}

func unhealthy(err error) error {
	if errors.Is(err, ErrStoreUnhealthy) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrStoreUnhealthy, err)
}

// WatchHealth calls report with the Server's health (as Health returns it)
// at once, then each time it changes, until ctx ends: serving is err == nil.
// It checks the store every interval (DefaultHealthInterval if interval is
// zero or less), and reports a store error seen by a call at once, without
// waiting for the next check. report is called from WatchHealth's goroutine,
// one call at a time. WatchHealth returns when ctx ends; run it with go.
//
// To drive the standard gRPC health service (google.golang.org/grpc/health):
//
//	hs := health.NewServer()
//	go idem.WatchHealth(ctx, 0, func(serving bool, err error) {
//		st := healthpb.HealthCheckResponse_SERVING
//		if !serving {
//			st = healthpb.HealthCheckResponse_NOT_SERVING
//		}
//		hs.SetServingStatus("", st)
//	})
func (s *Server) WatchHealth(ctx context.Context, interval time.Duration, report func(serving bool, err error)) {
	if interval <= 0 {
		interval = DefaultHealthInterval
	}
	var (
		reported  bool
		last      error
		checkFail error // the last failed check of the store, until one passes
	)
	emit := func(err error) {
		if reported && (err == nil) == (last == nil) {
			return
		}
		reported, last = true, err
		report(err == nil, err)
	}
	check := func() {
		cctx, cancel := context.WithTimeout(ctx, interval)
		passed, err := s.checkHealth(cctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		checkFail = nil
		if !passed {
			checkFail = err
		}
		emit(err)
	}
	check()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		changed, _ := s.health.watch()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			check()
		case <-changed:
			// A call saw the store fail, or succeed: say so now,
			// without waiting for the next check.
			_, callErr := s.health.watch()
			switch {
			case s.o.failOpen:
				emit(nil)
			case checkFail != nil:
				emit(checkFail)
			case callErr != nil:
				emit(unhealthy(callErr))
			default:
				emit(nil)
			}
		}
	}
}
