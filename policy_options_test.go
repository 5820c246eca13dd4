package idempotency_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
)

const legacy = testpb.PolicyService_Legacy_FullMethodName

// For a proto that cannot be annotated, Go options name its key field and
// its volatile fields, on the server and on the client.
func TestGoOptionsDeclareKeyFieldAndExclusions(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), []idempotency.Option{
		idempotency.WithRequiredKey(legacy),
		idempotency.WithKeyField("request_id", legacy),
		idempotency.WithFingerprintExclude(legacy, "annotations.trace_id"),
	})
	ctx := testCtx(t)
	req := func(rid, trace, tag string) *testpb.LegacyRequest {
		return &testpb.LegacyRequest{RequestId: rid, Account: "acct_1", AmountCents: 100, Annotations: &testpb.LegacyAnnotations{TraceId: trace, Tag: tag}}
	}

	_, err := e.client.Legacy(ctx, req("", "t1", "a"))
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	assert.Contains(t, status.Convert(err).Message(), "request_id")

	var header metadata.MD
	first, err := e.client.Legacy(ctx, req("legacy-1", "t1", "a"))
	require.NoError(t, err)
	again, err := e.client.Legacy(ctx, req("legacy-1", "t2", "a"), grpc.Header(&header))
	require.NoError(t, err, "annotations.trace_id is left out of the fingerprint")
	assert.True(t, idempotency.IsReplayed(header))
	assert.Equal(t, first.TransferId, again.TransferId)
	assert.Equal(t, idempotency.Completed, e.state(t, "legacy-1"))

	_, err = e.client.Legacy(ctx, req("legacy-1", "t1", "b"))
	require.Equal(t, codes.FailedPrecondition, status.Code(err), "annotations.tag counts: %v", err)
	assert.Equal(t, 1, e.svc.runsOf("Legacy"))
}

// The Go options that name fields are checked against the descriptors when
// they are set.
func TestGoFieldOptionsAreCheckedWhereSet(t *testing.T) {
	transfer := testpb.PolicyService_Transfer_FullMethodName
	for _, c := range []struct {
		opt  idempotency.Option
		want string
	}{
		{idempotency.WithKeyField("request_id", "/idempotency.testing.v1.PolicyService/Nope"), "no method Nope"},
		{idempotency.WithKeyField("request_id", "PolicyService/Legacy"), "/package.Service/Method"},
		{idempotency.WithKeyField("nope", legacy), "has no field nope"},
		{idempotency.WithKeyField("request_id_number", legacy), "a key field is a string"},
		{idempotency.WithKeyField("annotations", legacy), "a key field is a string"},
		{idempotency.WithKeyField("account", transfer), "marks idempotency.testing.v1.TransferRequest.request_id"},
		{idempotency.WithKeyField("not a name"), "not a field name"},
		{idempotency.WithFingerprintExclude(legacy, "annotations.nope"), `no field "nope"`},
		{idempotency.WithFingerprintExclude(legacy, "account.x"), "not a singular message field"},
		{idempotency.WithFingerprintExclude("/idempotency.testing.v1.Nope/Legacy", "account"), "not in the protobuf registry"},
	} {
		_, err := idempotency.NewServer(newMemstore(t), c.opt)
		require.Error(t, err, c.want)
		assert.Contains(t, err.Error(), c.want)
	}
	_, err := idempotency.NewServer(newMemstore(t),
		idempotency.WithKeyField("request_id", transfer, legacy), // the proto marks the same field
		idempotency.WithFingerprintExclude(legacy, "annotations", "account", "annotations.trace_id"))
	require.NoError(t, err)
}
