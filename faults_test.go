package idempotency_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"

	"github.com/grpcidem/idempotency/memstore"
)

// slowReplyStore answers Reserve late, as a database far away does: the
// reservation is made at once, but its answer takes replyDelay, and a caller
// that gives up meanwhile gets only its context's error.
type slowReplyStore struct {
	idempotency.Store
	replyDelay time.Duration
}

func (s slowReplyStore) Reserve(ctx context.Context, key string, c idempotency.Claim) (idempotency.Entry, error) {
	e, err := s.Store.Reserve(context.WithoutCancel(ctx), key, c)
	select {
	case <-time.After(s.replyDelay):
		return e, err
	case <-ctx.Done():
		return idempotency.Entry{}, ctx.Err()
	}
}

// TestCallerDeadlineDuringReserve: a caller whose deadline ends while its
// key is being reserved must not leave the key held: the retry with the same
// key runs at once (it used to wait for the whole lease).
func TestCallerDeadlineDuringReserve(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t testing.TB) idempotency.Store) {
		e := newEnv(t, slowReplyStore{newStore(t), 150 * time.Millisecond}, envConfig{})
		req := &testpb.ChargeRequest{Account: "a", AmountCents: 1, Currency: "EUR"}

		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		_, err := e.client.Charge(withKey(ctx, "k"), req)
		cancel()
		require.Equal(t, codes.DeadlineExceeded, status.Code(err), "%v", err)

		ctx, cancel = context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		start := time.Now()
		var header metadata.MD
		_, err = e.client.Charge(withKey(ctx, "k"), req, grpc.Header(&header))
		require.NoError(t, err, "the retry found the key held by the call that gave up")
		assert.False(t, idempotency.IsReplayed(header), "the first call never ran")
		assert.Less(t, time.Since(start), 2*time.Second)
		assert.Equal(t, int64(1), e.svc.execs.Load())
	})
}

// flakyCompleteStore fails the first failures Completes, as a store whose
// connection broke does.
type flakyCompleteStore struct {
	idempotency.Store
	failures atomic.Int64
}

func (s *flakyCompleteStore) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	if s.failures.Add(-1) >= 0 {
		return errors.New("connection reset by peer")
	}
	return s.Store.Complete(ctx, key, token, record, retention)
}

// TestCompleteIsRetried: a Complete that fails for a moment is retried
// within the store timeout, so the answered call's duplicate replays it
// instead of running the handler again once the lease runs out.
func TestCompleteIsRetried(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t testing.TB) idempotency.Store) {
		store := &flakyCompleteStore{Store: newStore(t)}
		store.failures.Store(3)
		e := newEnv(t, store, envConfig{server: []idempotency.Option{idempotency.WithLease(time.Second), idempotency.WithLogger(nil)}})
		ctx := testCtx(t)
		req := &testpb.ChargeRequest{Account: "a", AmountCents: 1, Currency: "EUR"}
		first, err := e.client.Charge(withKey(ctx, "k"), req)
		require.NoError(t, err)
		time.Sleep(1500 * time.Millisecond) // past the lease
		var header metadata.MD
		again, err := e.client.Charge(withKey(ctx, "k"), req, grpc.Header(&header))
		require.NoError(t, err)
		assert.True(t, idempotency.IsReplayed(header))
		assert.Equal(t, first.ChargeId, again.ChargeId, "the handler ran again")
		assert.Equal(t, int64(1), e.svc.execs.Load())
	})
}

// lostLeaseStore answers every Renew with ErrNotOwner, as a shared store does
// once another owner took the key over.
type lostLeaseStore struct{ idempotency.Store }

func (lostLeaseStore) Renew(context.Context, string, idempotency.Claim) error {
	return idempotency.ErrNotOwner
}

// TestLeaseLostCancelsHandler: when the renewal finds another owner on the
// key, the handler's context is cancelled with ErrLeaseLost, and its
// Execution reports it, so the handler can stop before its side effect.
func TestLeaseLostCancelsHandler(t *testing.T) {
	e := newEnv(t, lostLeaseStore{memstore.New()}, envConfig{server: []idempotency.Option{idempotency.WithLease(time.Second), idempotency.WithLogger(nil)}})
	e.svc.hold = make(chan struct{})
	e.svc.started = make(chan struct{}, 1)
	ctx := testCtx(t)
	done := make(chan error, 1)
	go func() {
		_, err := e.client.Charge(withKey(ctx, "k"), &testpb.ChargeRequest{Account: "a", AmountCents: 1, Currency: "EUR"})
		done <- err
	}()
	<-e.svc.started
	exec := e.svc.seenExecutions()[0]
	require.NotNil(t, exec)
	deadline := time.Now().Add(5 * time.Second)
	for exec.Err() == nil && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	assert.ErrorIs(t, exec.Err(), idempotency.ErrLeaseLost)
	close(e.svc.hold)
	<-done
	assert.ErrorIs(t, e.svc.lastCause(), idempotency.ErrLeaseLost, "the handler's context was not cancelled with ErrLeaseLost")
}

// TestUnaryOutlivingItsDeadlineKeepsItsMetadata: a unary handler that sets
// its header and trailer after its caller's deadline passed has them
// recorded, so the retry's replay carries them like any other.
func TestUnaryOutlivingItsDeadlineKeepsItsMetadata(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		e.svc.hold = make(chan struct{})
		e.svc.started = make(chan struct{}, 1)
		req := &testpb.ChargeRequest{Account: "a", AmountCents: 1, Currency: "EUR"}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, err := e.client.Charge(withKey(ctx, "late"), req)
		require.Equal(t, codes.DeadlineExceeded, status.Code(err), "%v", err)
		<-e.svc.started
		close(e.svc.hold) // the handler now sets its header and trailer

		var header, trailer metadata.MD
		resp, err := e.client.Charge(withKey(testCtx(t), "late"), req, grpc.Header(&header), grpc.Trailer(&trailer))
		require.NoError(t, err)
		assert.True(t, idempotency.IsReplayed(header))
		assert.Equal(t, []string{resp.ChargeId}, header.Get("x-charge-id"), "the header set after the deadline was not recorded")
		assert.Equal(t, []string{"entry-" + resp.ChargeId}, trailer.Get("x-ledger"), "the trailer set after the deadline was not recorded")
		assert.Equal(t, int64(1), e.svc.execs.Load())
	})
}
