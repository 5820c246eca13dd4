package idempotency

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

type ctxTestKey struct{}

// TestLazyDetachedContext: a detached lazyCtx behaves as
// context.WithTimeout(context.WithoutCancel(parent), d), built or not.
func TestLazyDetachedContext(t *testing.T) {
	parent, cancelParent := context.WithCancelCause(context.WithValue(context.Background(), ctxTestKey{}, "v"))
	cancelParent(errors.New("the caller gave up"))

	var c lazyCtx
	c.detach(parent, time.Now(), 50*time.Millisecond)
	if err := c.Err(); err != nil {
		t.Fatalf("Err = %v before the deadline, with its parent cancelled", err)
	}
	if got := c.Value(ctxTestKey{}); got != "v" {
		t.Fatalf("Value = %v, want the parent's", got)
	}
	if cause := context.Cause(&c); cause != nil {
		t.Fatalf("Cause = %v, want nil: the parent's cancellation must not show", cause)
	}
	if d, ok := c.Deadline(); !ok || time.Until(d) > 50*time.Millisecond {
		t.Fatalf("Deadline = %v, %v", d, ok)
	}
	// A context derived from it ends at its deadline.
	child, cancelChild := context.WithCancel(&c)
	defer cancelChild()
	select {
	case <-child.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a child of the detached context did not end at its deadline")
	}
	if !errors.Is(child.Err(), context.DeadlineExceeded) || !errors.Is(c.Err(), context.DeadlineExceeded) {
		t.Fatalf("Err = %v, %v; want DeadlineExceeded", child.Err(), c.Err())
	}

	// Unbuilt, its deadline shows in Err all the same.
	var late lazyCtx
	late.detach(context.Background(), time.Now(), time.Millisecond)
	time.Sleep(5 * time.Millisecond)
	if !errors.Is(late.Err(), context.DeadlineExceeded) {
		t.Fatalf("unbuilt Err = %v, want DeadlineExceeded", late.Err())
	}
	<-late.Done()

	// Ended before it was built: Canceled, and Done is closed.
	var ended lazyCtx
	ended.detach(context.Background(), time.Now(), time.Hour)
	ended.end(nil)
	if !errors.Is(ended.Err(), context.Canceled) {
		t.Fatalf("ended Err = %v", ended.Err())
	}
	select {
	case <-ended.Done():
	default:
		t.Fatal("ended context's Done is open")
	}
}

// TestLazyHandlerContext: a handler lazyCtx behaves as
// context.WithCancelCause(ContextWithExecution(parent, exec)).
func TestLazyHandlerContext(t *testing.T) {
	exec := &Execution{Key: "k"}

	t.Run("parent cancelled", func(t *testing.T) {
		parent, cancel := context.WithCancelCause(context.Background())
		var c lazyCtx
		c.child(parent, exec)
		if ExecutionFromContext(context.WithValue(&c, ctxTestKey{}, 1)) != exec {
			t.Fatal("the Execution is not found through a derived context")
		}
		child, cancelChild := context.WithCancel(&c)
		defer cancelChild()
		cause := errors.New("client went away")
		cancel(cause)
		<-child.Done()
		<-c.Done()
		if !errors.Is(c.Err(), context.Canceled) || context.Cause(&c) != cause || context.Cause(child) != cause {
			t.Fatalf("Err = %v, Cause = %v, child's Cause = %v", c.Err(), context.Cause(&c), context.Cause(child))
		}
	})
	t.Run("lease lost before anything waited", func(t *testing.T) {
		var c lazyCtx
		c.child(context.Background(), exec)
		c.end(ErrLeaseLost)
		<-c.Done()
		if context.Cause(&c) != ErrLeaseLost || !errors.Is(c.Err(), context.Canceled) {
			t.Fatalf("Cause = %v, Err = %v", context.Cause(&c), c.Err())
		}
	})
	t.Run("lease lost while waited on", func(t *testing.T) {
		var c lazyCtx
		c.child(context.Background(), exec)
		var woken atomic.Bool
		stop := context.AfterFunc(&c, func() { woken.Store(true) })
		defer stop()
		go c.end(ErrLeaseLost)
		<-c.Done()
		if context.Cause(&c) != ErrLeaseLost {
			t.Fatalf("Cause = %v", context.Cause(&c))
		}
		deadline := time.Now().Add(5 * time.Second)
		for !woken.Load() && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if !woken.Load() {
			t.Fatal("context.AfterFunc did not run")
		}
	})
	t.Run("ended", func(t *testing.T) {
		var c lazyCtx
		c.child(context.Background(), exec)
		c.end(nil)
		if !errors.Is(c.Err(), context.Canceled) || !errors.Is(context.Cause(&c), context.Canceled) {
			t.Fatalf("Err = %v, Cause = %v", c.Err(), context.Cause(&c))
		}
	})
}

// renewCounter counts Renew calls per key.
type renewCounter struct {
	Store
	mu sync.Mutex
	n  map[string]int
}

func (r *renewCounter) Renew(_ context.Context, key string, _ Claim) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n[key]++
	return nil
}

func (r *renewCounter) count(key string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[key]
}

// TestLeaseTimers: the renewals of a Server's leases come due from one
// timer, each again every third of the lease; a stopped lease is never
// renewed again, and the timer is stopped once no lease is left.
func TestLeaseTimers(t *testing.T) {
	store := &renewCounter{n: map[string]int{}}
	s := &Server{store: store, o: &options{lease: 30 * time.Millisecond, logger: slog.New(slog.DiscardHandler)}}
	keepers := make([]*leaseKeeper, 3)
	for i := range keepers {
		c := &call{s: s, skey: strconv.Itoa(i)}
		keepers[i] = c.keepLease(context.Background(), &firstRun{}, time.Now())
	}
	keepers[1].stop()
	s.leases.mu.Lock()
	if n := len(s.leases.due); n != 2 {
		t.Errorf("%d leases due after one of 3 stopped, want 2", n)
	}
	s.leases.mu.Unlock()
	time.Sleep(100 * time.Millisecond)
	for _, i := range []int{0, 2} {
		if n := store.count(strconv.Itoa(i)); n < 3 {
			t.Errorf("lease %d renewed %d times in 100ms, every 10ms", i, n)
		}
	}
	keepers[0].stop()
	keepers[2].stop()
	stopped := [3]int{store.count("0"), store.count("1"), store.count("2")}
	if stopped[1] != 0 {
		t.Errorf("a lease stopped before its first renewal was renewed %d times", stopped[1])
	}
	time.Sleep(50 * time.Millisecond)
	if now := [3]int{store.count("0"), store.count("1"), store.count("2")}; now != stopped {
		t.Errorf("renewals after stop: %v, then %v", stopped, now)
	}
	s.leases.mu.Lock()
	defer s.leases.mu.Unlock()
	if len(s.leases.due) != 0 || !s.leases.armed.IsZero() {
		t.Fatalf("after every lease stopped: %d due, timer armed for %v", len(s.leases.due), s.leases.armed)
	}
}
