package pgstore

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/grpcidem/idempotency"
)

// Errors of transactional mode.
var (
	// ErrNoExecution is returned by BeginTx when ctx is not the context of
	// a first execution: the handler was not called with an idempotency
	// key under the server interceptor (no key, a store that failed open,
	// or no interceptor). A handler that also serves such calls checks
	// idempotency.ExecutionFromContext and begins its own transaction.
	ErrNoExecution = errors.New("pgstore: BeginTx needs the context of a first execution (a handler called with an idempotency key under the server interceptor)")
	// ErrManagedTx is returned by Commit and Rollback of the transaction
	// that BeginTx returns, which do nothing: the store ends it with the
	// call, committing it with the record or rolling it back.
	ErrManagedTx = errors.New("pgstore: the transaction from BeginTx is committed with the call's record by the store, or rolled back; do not commit or roll it back yourself")
	// ErrExecutionDone is returned by BeginTx once the execution's
	// outcome has been stored or released.
	ErrExecutionDone = errors.New("pgstore: BeginTx after the execution's outcome was stored or released")
)

// txKey attaches a transaction to an Execution; it holds the Store so that
// two Stores never mix up their transactions.
type txKey struct{ s *Store }

type txState struct {
	tx         pgx.Tx
	handle     pgx.Tx // what the handler got: tx without Commit and Rollback
	key, token string
	done       atomic.Bool // set by the Complete or Release that ends tx
}

// managedTx is the handler's view of its transaction. Commit and Rollback
// refuse: a handler that ended the transaction itself would either commit
// writes without their record (and a retry would run them again) or roll
// back writes whose outcome gets replayed. Refusing also makes the common
// `defer tx.Rollback(ctx)` harmless. Savepoints (Begin) work as usual.
type managedTx struct {
	pgx.Tx
}

func (managedTx) Commit(context.Context) error   { return ErrManagedTx }
func (managedTx) Rollback(context.Context) error { return ErrManagedTx }

// BeginTx returns the transaction of the execution that ctx runs, beginning
// it (on the pool, with WithTxOptions) on the first call; later calls in the
// same execution return the same transaction. ctx must be the handler's
// context under the server interceptor, or BeginTx returns ErrNoExecution.
//
// The handler makes its writes with the transaction and must not commit or
// roll it back: its Commit and Rollback return ErrManagedTx and do nothing.
// When the call's outcome is stored, Complete writes the record in this
// transaction and commits it: the writes and the record persist together or
// not at all. If that fails (the key was taken over after the lease ran out,
// the connection died, a serialization failure), everything is rolled back
// and Complete returns an error wrapping idempotency.ErrRolledBack; the
// interceptor answers Aborted, and the caller's retry runs the handler again
// or replays a record that did commit. When the outcome is not stored (an
// error that is not cacheable), Release rolls the transaction back.
//
// To discard some writes but keep the outcome, use a savepoint (tx.Begin).
// The transaction holds a pool connection until the call ends; a handler
// that leaves the transaction in error (a failed statement not rolled back
// to a savepoint) makes Complete roll back and report ErrRolledBack.
//
// Which calls it covers. ctx must carry the call's idempotency.Execution,
// which the server interceptors put in the context they give a first
// execution's handler, for every RPC kind: a unary handler's ctx, a
// server-, client- or bidirectional-streaming handler's stream.Context(),
// and any context derived from them (a timeout, a value). BeginTx returns
// ErrNoExecution for a call without a key, a call run without idempotency
// (a method that takes no part, a store that failed open), and a context not
// derived from the handler's (context.Background() in a goroutine). A
// replay never reaches the handler. The transaction ends with the call: a
// goroutine that outlives the handler finds it committed or rolled back,
// and BeginTx then returns ErrExecutionDone.
//
// When the answer leaves. A unary call's response is sent after the commit.
// A stream's messages are sent as the handler sends them, before the
// commit: if the commit then fails, the client has received messages, then
// gets Aborted, and none of their writes exist. A stream's client should
// take its messages as final only with the final status OK.
//
// Every outcome that is not stored rolls the writes back (Release): an
// error code that is not cacheable, and a stream whose requests were cut
// short or whose send failed (see idempotency.Server.StreamServerInterceptor).
// An outcome that outgrows WithMaxRecordSize or WithMaxStreamMessages
// commits its writes with a status-only record (a duplicate is refused with
// FailedPrecondition), unless the server set WithRerunOversized, which
// releases the key and so rolls the writes back while the client still gets
// the handler's answer: do not combine the two.
func (s *Store) BeginTx(ctx context.Context) (pgx.Tx, error) {
	if s.closed.Load() {
		return nil, idempotency.ErrClosed
	}
	exec := idempotency.ExecutionFromContext(ctx)
	if exec == nil {
		return nil, ErrNoExecution
	}
	s.beginMu.Lock()
	defer s.beginMu.Unlock()
	if st, _ := exec.Value(txKey{s}).(*txState); st != nil {
		if st.done.Load() {
			return nil, ErrExecutionDone
		}
		return st.handle, nil
	}
	tx, err := s.pool.BeginTx(ctx, s.opts.txOptions)
	if err != nil {
		return nil, fmt.Errorf("pgstore: begin: %w", err)
	}
	st := &txState{tx: tx, handle: managedTx{tx}, key: exec.StoreKey, token: exec.Token}
	exec.SetValue(txKey{s}, st)
	return st.handle, nil
}

// takeTx detaches the transaction of ctx's execution, if it has one that has
// not been ended yet.
func (s *Store) takeTx(ctx context.Context) *txState {
	exec := idempotency.ExecutionFromContext(ctx)
	if exec == nil {
		return nil
	}
	st, _ := exec.Value(txKey{s}).(*txState)
	if st == nil || st.done.Swap(true) {
		return nil
	}
	return st
}

// completeTx stores the record in the handler's transaction and commits. Every
// failure rolls back and wraps ErrRolledBack, and only that, so that the
// interceptor tells the caller to retry. That holds even when the commit's
// outcome is unknown (the connection broke during COMMIT): the record and the
// writes are atomic, so the retry either replays the record or runs again.
func (s *Store) completeTx(ctx context.Context, st *txState, key, token string, record []byte, retention time.Duration) error {
	fail := func(format string, args ...any) error {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		st.tx.Rollback(rctx) // nothing to do about an error: the transaction cannot commit
		return fmt.Errorf("pgstore: %w: "+format, append([]any{idempotency.ErrRolledBack}, args...)...)
	}
	if err := checkRecord(key, retention); err != nil {
		// Wrapped too, so that errors.Is finds idempotency.ErrKeyTooLong;
		// ErrRolledBack decides the answer (Aborted): nothing happened.
		return fail("%w", err)
	}
	switch {
	case s.closed.Load():
		return fail("the store is closed")
	case key != st.key || token != st.token:
		return fail("the transaction belongs to another execution (key or token differ)")
	}
	conn := st.tx.Conn()
	if conn.IsClosed() {
		return fail("the handler's connection is closed")
	}
	if status := conn.PgConn().TxStatus(); status != 'T' {
		reason := "the handler ended the transaction itself"
		if status == 'E' {
			reason = "a statement of the handler failed, and the transaction is aborted"
		}
		return fail("%s", reason)
	}
	var waiters bool
	err := st.tx.QueryRow(ctx, s.sql.complete, []byte(key), token, record, micros(retention)).Scan(&waiters)
	if errors.Is(err, pgx.ErrNoRows) {
		return fail("%v: another owner took the key over after the lease ran out", idempotency.ErrNotOwner)
	}
	if err != nil {
		return fail("storing the record: %v", err)
	}
	if err := st.tx.Commit(ctx); err != nil {
		return fail("commit: %v", err)
	}
	if waiters {
		s.notifier.add(key)
	}
	return nil
}
