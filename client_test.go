package idempotency_test

import (
	"context"
	"math"
	"strings"
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

func clientEnv(t *testing.T, opts ...idempotency.CallOption) *env {
	return newEnv(t, memstore.New(), envConfig{client: []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor(opts...)),
	}})
}

func TestClientAttachesFreshKeys(t *testing.T) {
	e := clientEnv(t)
	require.NoError(t, charge(testCtx(t), e, chargeReq).err)
	require.NoError(t, charge(testCtx(t), e, chargeReq).err)
	keys := e.svc.seenKeys()
	require.Len(t, keys, 2)
	assert.Len(t, keys[0], 22, "128 random bits in unpadded base64")
	assert.NoError(t, idempotency.ValidateKey(keys[0]))
	assert.NotEqual(t, keys[0], keys[1], "each logical call gets its own key")
}

func TestClientExplicitKeyAndReplayed(t *testing.T) {
	e := clientEnv(t)
	var replayed bool
	first, err := e.client.Charge(testCtx(t), chargeReq, idempotency.WithKey("order-7"), idempotency.Replayed(&replayed))
	require.NoError(t, err)
	assert.False(t, replayed)
	again, err := e.client.Charge(testCtx(t), chargeReq, idempotency.WithKey("order-7"), idempotency.Replayed(&replayed))
	require.NoError(t, err)
	assert.True(t, replayed)
	assert.Equal(t, first.ChargeId, again.ChargeId)

	// A key already in the outgoing metadata is kept.
	_, err = e.client.Charge(withKey(testCtx(t), "from-metadata"), chargeReq)
	require.NoError(t, err)
	assert.Equal(t, []string{"order-7", "from-metadata"}, e.svc.seenKeys())
}

func TestClientWithoutKey(t *testing.T) {
	e := clientEnv(t, idempotency.WithMaxAttempts(5))
	e.svc.failFirst.Store(1)
	_, err := e.client.Charge(testCtx(t), chargeReq, idempotency.WithoutKey())
	assert.Equal(t, codes.Unavailable, status.Code(err), "no key, no retry: a retry would not be safe")
	assert.Equal(t, []string(nil), e.svc.seenKeys())
	assert.EqualValues(t, 1, e.svc.execs.Load())
}

func TestClientRetriesKeepTheKey(t *testing.T) {
	e := clientEnv(t, idempotency.WithMaxAttempts(5), idempotency.WithBackoff(time.Millisecond, 5*time.Millisecond))
	e.svc.failFirst.Store(2)
	var attempts int
	var replayed bool
	_, err := e.client.Charge(testCtx(t), chargeReq, idempotency.Attempts(&attempts), idempotency.Replayed(&replayed))
	require.NoError(t, err)
	assert.Equal(t, 3, attempts)
	assert.False(t, replayed, "the third attempt was the first successful execution")
	keys := e.svc.seenKeys()
	require.Len(t, keys, 3)
	assert.Equal(t, keys[0], keys[1])
	assert.Equal(t, keys[0], keys[2])
}

func TestClientRetriesWithinDeadline(t *testing.T) {
	e := clientEnv(t, idempotency.WithMaxAttempts(1000), idempotency.WithBackoff(20*time.Millisecond, 50*time.Millisecond))
	e.svc.failFirst.Store(1 << 30)
	ctx, cancel := context.WithTimeout(testCtx(t), 300*time.Millisecond)
	defer cancel()
	var attempts int
	start := time.Now()
	_, err := e.client.Charge(ctx, chargeReq, idempotency.Attempts(&attempts))
	// Usually the last real error; DeadlineExceeded only when the deadline
	// fell during an attempt, never because the helper slept past it.
	assert.Contains(t, []codes.Code{codes.Unavailable, codes.DeadlineExceeded}, status.Code(err), "%v", err)
	assert.Less(t, time.Since(start), 2*time.Second, "the helper stops at the caller's deadline")
	assert.Greater(t, attempts, 1)
	assert.Less(t, attempts, 1000)
}

func TestClientPerAttemptTimeoutThenReplay(t *testing.T) {
	e := clientEnv(t, idempotency.WithMaxAttempts(50), idempotency.WithPerAttemptTimeout(50*time.Millisecond),
		idempotency.WithBackoff(time.Millisecond, 10*time.Millisecond))
	e.svc.hold = make(chan struct{})
	e.svc.started = make(chan struct{}, 1)
	go func() {
		<-e.svc.started
		time.Sleep(200 * time.Millisecond) // several attempts time out meanwhile
		close(e.svc.hold)
	}()
	var attempts int
	var replayed bool
	_, err := e.client.Charge(testCtx(t), chargeReq, idempotency.Attempts(&attempts), idempotency.Replayed(&replayed))
	require.NoError(t, err)
	assert.Greater(t, attempts, 1)
	assert.True(t, replayed, "a later attempt got the first attempt's outcome")
	assert.EqualValues(t, 1, e.svc.execs.Load(), "attempts that timed out did not run the handler again")
}

func TestClientKeyStableAcrossGRPCRetryPolicy(t *testing.T) {
	const serviceConfig = `{"methodConfig": [{
		"name": [{"service": "idempotency.testing.v1.PaymentService"}],
		"retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
			"backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}`
	e := newEnv(t, memstore.New(), envConfig{client: []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor()),
		grpc.WithDefaultServiceConfig(serviceConfig),
	}})
	e.svc.failFirst.Store(2)
	var attempts int
	_, err := e.client.Charge(testCtx(t), chargeReq, idempotency.Attempts(&attempts))
	require.NoError(t, err)
	assert.Equal(t, 1, attempts, "grpc-go retried below the interceptor")
	keys := e.svc.seenKeys()
	require.Len(t, keys, 3, "grpc-go's retry policy ran three attempts")
	assert.Equal(t, keys[0], keys[1])
	assert.Equal(t, keys[0], keys[2])
}

// TestClientRefusesMisuse: a key the server would refuse, or a duration out
// of range, fails the call with InvalidArgument before anything is sent; at
// dial time it panics, so it is caught when the client is built.
func TestClientRefusesMisuse(t *testing.T) {
	e := clientEnv(t)
	ctx := testCtx(t)
	req := &testpb.ChargeRequest{Account: "a", AmountCents: 1, Currency: "EUR"}
	for _, opt := range []grpc.CallOption{
		idempotency.WithKey(""),
		idempotency.WithKey(strings.Repeat("k", 256)),
		idempotency.WithKey("café"),
		idempotency.WithKey("a b"),
		idempotency.WithBackoff(time.Nanosecond, 0),
		idempotency.WithBackoff(time.Second, math.MaxInt64),
		idempotency.WithBackoff(time.Minute, time.Second),
		idempotency.WithPerAttemptTimeout(-time.Second),
	} {
		_, err := e.client.Charge(ctx, req, opt)
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
		assert.Contains(t, status.Convert(err).Message(), "idempotency: ")
	}
	assert.Zero(t, e.svc.execs.Load(), "a refused call reached the server")
	assert.Panics(t, func() { idempotency.UnaryClientInterceptor(idempotency.WithBackoff(time.Second, math.MaxInt64)) })
	assert.Panics(t, func() { idempotency.StreamClientInterceptor(idempotency.WithPerAttemptTimeout(2 * time.Hour)) })
}

// TestClientRefusesBadMetadataKey: a key the caller put in the outgoing
// metadata itself is held to the contract too, before anything is sent.
func TestClientRefusesBadMetadataKey(t *testing.T) {
	e := clientEnv(t)
	req := &testpb.ChargeRequest{Account: "a", AmountCents: 1, Currency: "EUR"}
	for _, md := range [][]string{
		{idempotency.KeyHeader, "café"},
		{idempotency.KeyHeader, strings.Repeat("k", 256)},
		{idempotency.KeyHeader, "a", idempotency.KeyHeader, "b"},
	} {
		ctx := metadata.AppendToOutgoingContext(testCtx(t), md...)
		_, err := e.client.Charge(ctx, req)
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	}
	assert.Zero(t, e.svc.execs.Load(), "a refused call reached the server")
}
