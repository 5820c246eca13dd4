package idempotency_test

import (
	"context"
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
