package idempotency_test

import (
	"context"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
)

// An interceptor outside ours that rewrites the response in place (a
// redaction, say) changes what its caller gets, never what later replays
// return: every replay's response is the caller's own.
func TestReplayedResponseBelongsToTheCall(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		redact := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			resp, err := handler(ctx, req)
			if r, ok := resp.(*testpb.ChargeResponse); ok {
				r.Account = r.Account[:2] + "***"
				r.AmountCents++
			}
			return resp, err
		}
		e := newEnv(t, newStore(t), envConfig{serverOpt: []grpc.ServerOption{grpc.ChainUnaryInterceptor(redact)}})
		ctx := withKey(testCtx(t), "order-redacted")

		first := charge(ctx, e, chargeReq)
		require.NoError(t, first.err)
		for range 3 {
			again := charge(ctx, e, chargeReq)
			require.NoError(t, again.err)
			assert.True(t, idempotency.IsReplayed(again.header))
			assert.Equal(t, mustMarshal(t, first.resp), mustMarshal(t, again.resp))
		}
		assert.Equal(t, "ac***", first.resp.Account)
		assert.EqualValues(t, 1, e.svc.execs.Load())
	})
}

// An interceptor outside ours may still set header metadata after a replay
// returns, as after a first execution: the replay sets its header, it does
// not send it (grpc.SendHeader would spare grpc-go's copy of it, and refuse
// the outer interceptor's).
func TestOuterInterceptorSetsHeaderAfterReplay(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		outer := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			resp, err := handler(ctx, req)
			if herr := grpc.SetHeader(ctx, metadata.Pairs("x-outer", "set-after")); herr != nil {
				return nil, herr
			}
			return resp, err
		}
		e := newEnv(t, newStore(t), envConfig{serverOpt: []grpc.ServerOption{grpc.ChainUnaryInterceptor(outer)}})
		ctx := withKey(testCtx(t), "order-outer-header")

		first := charge(ctx, e, chargeReq)
		require.NoError(t, first.err)
		assert.Equal(t, []string{"set-after"}, first.header.Get("x-outer"))
		for range 3 {
			again := charge(ctx, e, chargeReq)
			require.NoError(t, again.err)
			assert.True(t, idempotency.IsReplayed(again.header))
			assert.Equal(t, []string{"set-after"}, again.header.Get("x-outer"))
			assert.Equal(t, stripped(first.header), stripped(again.header))
		}
	})
}

// Concurrent replays of one record, each written to in place by an outer
// interceptor, share no response: under -race, a shared one is a data race
// (the interceptor puts back what it wrote, so that the answers alone would
// not show it).
func TestConcurrentReplaysShareNoResponse(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		rewrite := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			resp, err := handler(ctx, req)
			if r, ok := resp.(*testpb.ChargeResponse); ok {
				id, amount := r.ChargeId, r.AmountCents
				r.ChargeId, r.AmountCents = "rewritten", -1
				r.ChargeId, r.AmountCents = id, amount
			}
			return resp, err
		}
		e := newEnv(t, newStore(t), envConfig{serverOpt: []grpc.ServerOption{grpc.ChainUnaryInterceptor(rewrite)}})
		ctx := withKey(testCtx(t), "order-concurrent-replays")
		first := charge(ctx, e, chargeReq)
		require.NoError(t, first.err)
		want := mustMarshal(t, first.resp)

		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for range 10 {
					again := charge(ctx, e, chargeReq)
					if assert.NoError(t, again.err) {
						assert.True(t, idempotency.IsReplayed(again.header))
						assert.Equal(t, want, mustMarshal(t, again.resp))
					}
				}
			})
		}
		wg.Wait()
		assert.EqualValues(t, 1, e.svc.execs.Load())
	})
}
