package idempotency_test

import (
	"context"
	"io"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
)

var uuid4 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// The client gives keys only to methods that take part, read from the same
// descriptors as the server: a key field is filled with a UUID4, other
// methods get the metadata.
func TestClientKeysOnlyMethodsThatTakePart(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), nil,
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor()),
		grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor()))
	ctx := testCtx(t)

	for _, m := range []struct {
		name string
		f    func(context.Context, *testpb.TransferRequest, ...grpc.CallOption) (*testpb.TransferResponse, error)
	}{{"Inspect", e.client.Inspect}, {"SetLimit", e.client.SetLimit}, {"Ping", e.client.Ping}} {
		req := &testpb.TransferRequest{AmountCents: 1}
		require.NoError(t, call(ctx, m.f, req).err)
		assert.Equal(t, []string{""}, e.keys.of("/idempotency.testing.v1.PolicyService/"+m.name), "%s gets no key", m.name)
		assert.Empty(t, req.RequestId, "%s's key field is left alone", m.name)
	}
	_, err := e.health.Check(ctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	assert.Equal(t, []string{""}, e.keys.of(healthpb.Health_Check_FullMethodName), "health checks get no key")

	// A key field is filled in the caller's request, and the metadata
	// stays empty.
	req := &testpb.TransferRequest{AmountCents: 1}
	require.NoError(t, call(ctx, e.client.Transfer, req).err)
	assert.Regexp(t, uuid4, req.RequestId)
	assert.Equal(t, []string{""}, e.keys.of(testpb.PolicyService_Transfer_FullMethodName))
	seen := e.svc.seenRequestIDs()
	assert.Equal(t, req.RequestId, seen[len(seen)-1], "the handler saw the filled field")

	// Methods the proto says nothing about get a metadata key, as before.
	_, err = e.pay.Charge(ctx, chargeReq)
	require.NoError(t, err)
	keys := e.keys.of(testpb.PaymentService_Charge_FullMethodName)
	require.Len(t, keys, 1)
	assert.NoError(t, idempotency.ValidateKey(keys[0]))

	// A server stream's key field is filled too.
	sreq := &testpb.TransferRequest{AmountCents: 1, Count: 2}
	stream, err := e.client.TransferSteps(ctx, sreq)
	require.NoError(t, err)
	for range 2 {
		_, err := stream.Recv()
		require.NoError(t, err)
	}
	_, err = stream.Recv()
	require.ErrorIs(t, err, io.EOF)
	assert.Regexp(t, uuid4, sreq.RequestId)
	assert.Equal(t, []string{""}, e.keys.of(testpb.PolicyService_TransferSteps_FullMethodName))

	// A client stream carries its key as metadata.
	bs, err := e.client.TransferBatch(ctx)
	require.NoError(t, err)
	require.NoError(t, bs.Send(&testpb.TransferRequest{AmountCents: 1}))
	_, err = bs.CloseAndRecv()
	require.NoError(t, err)
	keys = e.keys.of(testpb.PolicyService_TransferBatch_FullMethodName)
	require.Len(t, keys, 1)
	assert.NotEmpty(t, keys[0])
}

// The key field is filled once, before the first attempt, so that every
// retry carries it; a key field the caller filled is kept.
func TestClientFillsTheKeyFieldOnce(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), nil,
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor(idempotency.WithMaxAttempts(5), idempotency.WithBackoff(time.Millisecond, time.Millisecond))),
		grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor(idempotency.WithMaxAttempts(5), idempotency.WithBackoff(time.Millisecond, time.Millisecond))))
	ctx := testCtx(t)

	e.svc.failFirst.Store(2)
	req := &testpb.TransferRequest{AmountCents: 1}
	var attempts int
	a := call(ctx, e.client.Transfer, req, idempotency.Attempts(&attempts))
	require.NoError(t, a.err)
	assert.Equal(t, 3, attempts)
	assert.Regexp(t, uuid4, req.RequestId)
	assert.Equal(t, []string{req.RequestId, req.RequestId, req.RequestId}, e.svc.seenRequestIDs(), "every attempt carries the same key")

	// The caller's own key is kept, and a later call with it replays.
	mine := &testpb.TransferRequest{RequestId: "order-77", AmountCents: 1}
	first := call(ctx, e.client.Transfer, mine)
	again := call(ctx, e.client.Transfer, mine)
	require.NoError(t, again.err)
	assert.Equal(t, "order-77", mine.RequestId)
	assert.True(t, again.replayed())
	assert.Equal(t, first.resp.TransferId, again.resp.TransferId)

	// A server stream that fails before its first answer is reopened with
	// the same request, and so the same key.
	e.svc.failFirst.Store(1)
	sreq := &testpb.TransferRequest{AmountCents: 1, Count: 1}
	stream, err := e.client.TransferSteps(ctx, sreq)
	require.NoError(t, err)
	resp, err := stream.Recv()
	require.NoError(t, err)
	assert.Equal(t, sreq.RequestId, resp.RequestId)
	ids := e.svc.seenRequestIDs()
	assert.Equal(t, []string{sreq.RequestId, sreq.RequestId}, ids[len(ids)-2:])
}

// A key the contract refuses, or two different keys, are refused by the
// client before anything is sent.
func TestClientRefusesBadKeyFields(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), nil,
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor()),
		grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor()))
	ctx := testCtx(t)

	a := call(ctx, e.client.Transfer, &testpb.TransferRequest{RequestId: "has space"})
	require.Equal(t, codes.InvalidArgument, status.Code(a.err), "%v", a.err)
	assert.Contains(t, status.Convert(a.err).Message(), "request_id")
	a = call(ctx, e.client.Transfer, &testpb.TransferRequest{RequestId: "rid-a"}, idempotency.WithKey("rid-b"))
	require.Equal(t, codes.InvalidArgument, status.Code(a.err), "%v", a.err)
	a = call(withKey(ctx, "rid-b"), e.client.Transfer, &testpb.TransferRequest{RequestId: "rid-a"})
	require.Equal(t, codes.InvalidArgument, status.Code(a.err), "%v", a.err)
	_, err := e.client.TransferSteps(ctx, &testpb.TransferRequest{RequestId: "has space", Count: 1})
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	assert.Empty(t, e.keys.of(testpb.PolicyService_Transfer_FullMethodName), "nothing was sent")
	assert.Empty(t, e.keys.of(testpb.PolicyService_TransferSteps_FullMethodName), "nothing was sent")

	// WithKey with an empty key field: the key goes in the metadata, the
	// field stays as the caller left it.
	req := &testpb.TransferRequest{AmountCents: 1}
	require.NoError(t, call(ctx, e.client.Transfer, req, idempotency.WithKey("order-9")).err)
	assert.Empty(t, req.RequestId)
	assert.Equal(t, []string{"order-9"}, e.keys.of(testpb.PolicyService_Transfer_FullMethodName))
	a = call(ctx, e.client.Transfer, &testpb.TransferRequest{RequestId: "order-9", AmountCents: 1}, idempotency.WithKey("order-9"))
	require.NoError(t, a.err, "the same key in both places")
	assert.True(t, a.replayed())

	// A key given explicitly is sent even to a method that takes no part.
	require.NoError(t, call(ctx, e.client.Inspect, &testpb.TransferRequest{}, idempotency.WithKey("explicit")).err)
	assert.Equal(t, []string{"explicit"}, e.keys.of(testpb.PolicyService_Inspect_FullMethodName))
}

// Methods declared NO_SIDE_EFFECTS or IDEMPOTENT get no key, and are
// retried all the same: the proto says a retry is safe.
func TestClientRetriesDeclaredSafeMethodsWithoutAKey(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), nil,
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor(idempotency.WithMaxAttempts(3), idempotency.WithBackoff(time.Millisecond, time.Millisecond))))
	ctx := testCtx(t)
	e.svc.failFirst.Store(1)
	var attempts int
	require.NoError(t, call(ctx, e.client.Inspect, &testpb.TransferRequest{}, idempotency.Attempts(&attempts)).err)
	assert.Equal(t, 2, attempts)
	assert.Equal(t, []string{"", ""}, e.keys.of(testpb.PolicyService_Inspect_FullMethodName))

	e.svc.failFirst.Store(1)
	a := call(ctx, e.client.Ping, &testpb.TransferRequest{}, idempotency.Attempts(&attempts))
	require.Equal(t, codes.Unavailable, status.Code(a.err), "PARTICIPATION_NONE says nothing about safety: no key, no retry")
	assert.Equal(t, 1, attempts)
}

// For a proto that cannot be annotated, WithClientKeyField names the key
// field on the client, at dial time or per call, as WithKeyField does on the
// server.
func TestClientKeyFieldOption(t *testing.T) {
	ctx := testCtx(t)
	req := func() *testpb.LegacyRequest {
		return &testpb.LegacyRequest{Account: "acct_1", AmountCents: 100, Annotations: &testpb.LegacyAnnotations{TraceId: "t1"}}
	}
	c := newPolicyEnv(t, newMemstore(t), []idempotency.Option{idempotency.WithKeyField("request_id")},
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor(idempotency.WithClientKeyField("request_id", legacy))))
	r := req()
	_, err := c.client.Legacy(ctx, r)
	require.NoError(t, err)
	assert.Regexp(t, uuid4, r.RequestId)
	assert.Equal(t, []string{""}, c.keys.of(legacy), "the key is in the field, not the metadata")
	assert.Equal(t, idempotency.Completed, c.state(t, r.RequestId), "WithKeyField without methods covers every request with the field")

	d := newPolicyEnv(t, newMemstore(t), []idempotency.Option{idempotency.WithKeyField("request_id", legacy)},
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor()))
	r = req()
	_, err = d.client.Legacy(ctx, r, idempotency.WithClientKeyField("request_id"))
	require.NoError(t, err)
	assert.Regexp(t, uuid4, r.RequestId)
	assert.Equal(t, []string{""}, d.keys.of(legacy))
	assert.Equal(t, idempotency.Completed, d.state(t, r.RequestId))

	assert.PanicsWithValue(t, `idempotency: WithClientKeyField("nope", "/idempotency.testing.v1.PolicyService/Legacy"): idempotency.testing.v1.LegacyRequest has no field nope`, func() {
		idempotency.UnaryClientInterceptor(idempotency.WithClientKeyField("nope", legacy))
	})
	e := newPolicyEnv(t, newMemstore(t), nil, grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor()))
	_, err = e.client.Legacy(testCtx(t), &testpb.LegacyRequest{}, idempotency.WithClientKeyField("request_id_number", legacy))
	require.Equal(t, codes.InvalidArgument, status.Code(err), "a misuse per call fails the call: %v", err)
}
