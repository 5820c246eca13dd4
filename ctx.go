package idempotency

import (
	"context"
	"sync"
	"time"
)

// lazyCtx is a context derived from parent that makes the context package's
// own context (a cancelCtx, or a timerCtx with its timer, a done channel and
// a link into the parent's children: four or five allocations) only when
// something needs it: a call of Done (to wait on it, or to derive a
// cancellable context from it), a cancel with a cause, or a look-up of a
// value after it ended. Until then, Err and Deadline are answered from the
// parent and the clock, with the same results. Most store calls of the
// in-process stores never wait on their context, so they cost none of that.
//
// A detached lazyCtx has the values of its parent but not its cancellation,
// and ends at its deadline: context.WithTimeout(context.WithoutCancel(parent),
// d). Otherwise it is context.WithCancelCause(parent), with the Execution
// exec (if set) as a value, as ContextWithExecution adds it.
type lazyCtx struct {
	parent   context.Context
	detached bool
	deadline time.Time // detached only
	exec     *Execution

	mu     sync.Mutex
	built  context.Context
	cancel context.CancelCauseFunc
	values context.Context // detached: context.WithoutCancel(parent), for Value
	ended  bool            // cancelled before it was built
}

// detach makes c context.WithTimeout(context.WithoutCancel(parent), d), as
// made at now (the caller's time.Now, taken a moment before).
func (c *lazyCtx) detach(parent context.Context, now time.Time, d time.Duration) {
	c.parent, c.detached, c.deadline = parent, true, now.Add(d)
}

// child makes c context.WithCancelCause(ContextWithExecution(parent, exec)).
func (c *lazyCtx) child(parent context.Context, exec *Execution) {
	c.parent, c.exec = parent, exec
}

// build returns c's real context, made on the first call. c.mu is held.
func (c *lazyCtx) buildLocked() context.Context {
	if c.built != nil {
		return c.built
	}
	if c.detached {
		ctx, cancel := context.WithDeadline(c.valuesLocked(), c.deadline)
		c.built, c.cancel = ctx, func(error) { cancel() }
	} else {
		c.built, c.cancel = context.WithCancelCause(c.parent)
	}
	if c.ended {
		c.cancel(nil)
	}
	return c.built
}

func (c *lazyCtx) valuesLocked() context.Context {
	if c.values == nil {
		c.values = context.WithoutCancel(c.parent)
	}
	return c.values
}

// end cancels c with cause (nil: context.Canceled). A cancel without a
// cause before c was built only marks it ended: nothing can be waiting on
// a context that was never built.
func (c *lazyCtx) end(cause error) {
	c.mu.Lock()
	if c.built == nil && cause == nil {
		c.ended = true
		c.mu.Unlock()
		return
	}
	c.buildLocked()
	cancel := c.cancel
	c.mu.Unlock()
	cancel(cause)
}

func (c *lazyCtx) Deadline() (time.Time, bool) {
	if c.detached {
		return c.deadline, true
	}
	return c.parent.Deadline()
}

func (c *lazyCtx) Done() <-chan struct{} {
	c.mu.Lock()
	ctx := c.buildLocked()
	c.mu.Unlock()
	return ctx.Done()
}

func (c *lazyCtx) Err() error {
	c.mu.Lock()
	built, ended := c.built, c.ended
	c.mu.Unlock()
	switch {
	case built != nil:
		return built.Err()
	case ended:
		return context.Canceled
	case c.detached:
		if !time.Now().Before(c.deadline) {
			return context.DeadlineExceeded
		}
		return nil
	}
	return c.parent.Err()
}

func (c *lazyCtx) Value(key any) any {
	if c.exec != nil {
		if _, ok := key.(executionKey); ok {
			return c.exec
		}
	}
	c.mu.Lock()
	var ctx context.Context
	switch {
	case c.built != nil || c.ended:
		// Once ended, the context package's cancelCtx (which
		// context.Cause looks up as a value) must be c's own.
		ctx = c.buildLocked()
	case c.detached:
		ctx = c.valuesLocked()
	default:
		ctx = c.parent
	}
	c.mu.Unlock()
	return ctx.Value(key)
}

func (c *lazyCtx) String() string {
	if c.detached {
		return "idempotency.detachedContext"
	}
	return "idempotency.handlerContext"
}
