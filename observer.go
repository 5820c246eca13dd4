package idempotency

import (
	"strconv"
	"time"

	"google.golang.org/grpc/codes"
)

// EventKind says what happened to a keyed call.
type EventKind uint8

const (
	// EventExecuted: the handler ran as the first execution of its key.
	// Event.Code is its status code; Event.Stored says whether its outcome
	// was stored.
	EventExecuted EventKind = iota + 1
	// EventReplayed: a duplicate was answered from the stored record.
	EventReplayed
	// EventMismatch: the key was reused for another method or request;
	// the call got FailedPrecondition.
	EventMismatch
	// EventConflict: a duplicate arrived while the first call was running
	// and was refused with Aborted (reject mode, or the wait ran out).
	EventConflict
	// EventStoreError: a store call failed. Event.Err says which and why.
	EventStoreError
	// EventRecordTooLarge: the outcome outgrew WithMaxRecordSize or
	// WithMaxStreamMessages; it was returned, and only its status stored
	// (or, with WithRerunOversized, nothing, and the key released).
	EventRecordTooLarge
	// EventFailOpen: the store failed and the handler ran without
	// idempotency (WithFailOpen).
	EventFailOpen
)

func (k EventKind) String() string {
	switch k {
	case EventExecuted:
		return "executed"
	case EventReplayed:
		return "replayed"
	case EventMismatch:
		return "mismatch"
	case EventConflict:
		return "conflict"
	case EventStoreError:
		return "store_error"
	case EventRecordTooLarge:
		return "record_too_large"
	case EventFailOpen:
		return "fail_open"
	}
	return "EventKind(" + strconv.Itoa(int(k)) + ")"
}

// An Event is reported to every observer set by WithObserver, with the
// context of the call it happened to (its span, deadline and values).
type Event struct {
	Kind EventKind
	// Method is the full gRPC method name.
	Method string
	// Scope and Key identify the record.
	Scope, Key string
	// Code is the status code returned to the caller.
	Code codes.Code
	// Stored is true for an EventExecuted whose outcome was stored.
	Stored bool
	// Duration is how long the handler ran (EventExecuted) or how long the
	// duplicate took to be answered (EventReplayed, EventConflict),
	// waiting for a running first execution included.
	Duration time.Duration
	// Waited is true for an EventReplayed or EventConflict of a duplicate
	// that found its key's first execution still running and waited for it.
	Waited bool
	// Size is the size in bytes of the record stored for an EventExecuted
	// (0 when none was stored), and of the record that was too large for
	// an EventRecordTooLarge when it is known (0 for a stream cut off by
	// its message or byte bound).
	Size int
	// Err is the failure behind EventStoreError, EventFailOpen and
	// EventRecordTooLarge, and is set on an EventExecuted whose handler
	// panicked (its key was released).
	Err error
}
