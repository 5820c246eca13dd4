package idempotency

import (
	"context"
	"sync"
	"sync/atomic"
)

// An Execution is the first execution of a keyed call: the one run that every
// duplicate of the call will be answered from. The server interceptors put it
// in the handler's context; ExecutionFromContext gets it back. Stores use it to
// tie work done by the handler to the record they store (pgstore commits the
// handler's own writes in the transaction that stores the record), and
// handlers can use it to log the key they serve.
type Execution struct {
	// Method is the full gRPC method name.
	Method string
	// Scope is the caller's scope, from WithScope ("" by default).
	Scope string
	// Key is the caller's idempotency key.
	Key string
	// StoreKey is StoreKey(Scope, Key): the key the Store holds.
	StoreKey string
	// Token is the owner token under which the key is reserved.
	Token string

	mu     sync.Mutex
	values map[any]any

	lost   atomic.Bool
	cancel *lazyCtx // the handler's context
}

// Err returns ErrLeaseLost once another owner has taken the execution's key
// over (its lease ran out while its process was paused or cut off from a
// shared store, and a duplicate took the key), and nil before. The handler's
// context is then cancelled with the same cause (context.Cause). A handler
// that has not made its side effect yet should stop: the other owner runs
// the call, and this execution's outcome will not be stored.
func (e *Execution) Err() error {
	if e.lost.Load() {
		return ErrLeaseLost
	}
	return nil
}

// loseLease marks the execution's lease as taken over and cancels its
// handler's context.
func (e *Execution) loseLease() {
	e.lost.Store(true)
	if e.cancel != nil {
		e.cancel.end(ErrLeaseLost)
	}
}

type executionKey struct{}

// ExecutionFromContext returns the Execution that ctx runs, or nil when ctx is
// not the context of a first execution (no key, a replay, or no interceptor).
func ExecutionFromContext(ctx context.Context) *Execution {
	e, _ := ctx.Value(executionKey{}).(*Execution)
	return e
}

// ContextWithExecution returns a copy of ctx that carries e. The interceptors
// call it; Store implementations call it in tests that drive a Store directly.
func ContextWithExecution(ctx context.Context, e *Execution) context.Context {
	return context.WithValue(ctx, executionKey{}, e)
}

// SetValue attaches v to the execution under k, for a Store or a handler to
// find later in the same execution. k should be an unexported type of the
// caller's package, as with context keys.
func (e *Execution) SetValue(k, v any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.values == nil {
		e.values = make(map[any]any)
	}
	e.values[k] = v
}

// Value returns what SetValue attached under k, or nil.
func (e *Execution) Value(k any) any {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.values[k]
}
