package idempotency_test

import (
	"context"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"

	"github.com/grpcidem/idempotency/memstore"
)

func newMemstore(t testing.TB) idempotency.Store {
	s := memstore.New()
	t.Cleanup(func() { s.Close() })
	return s
}

// The proto's own declarations decide which methods take part: a required
// key, an optional one, none, and idempotency_level.
func TestProtoDeclaresWhichMethodsTakePart(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), nil)
	ctx := testCtx(t)
	req := &testpb.TransferRequest{Account: "acct_1", AmountCents: 100}

	// PARTICIPATION_KEY_REQUIRED: no key, no run.
	a := call(ctx, e.client.Transfer, req)
	require.Equal(t, codes.InvalidArgument, status.Code(a.err), "%v", a.err)
	assert.Contains(t, status.Convert(a.err).Message(), idempotency.KeyHeader)
	assert.Contains(t, status.Convert(a.err).Message(), "request_id", "the error names the key field too")
	assert.Zero(t, e.svc.runsOf("Transfer"))

	// PARTICIPATION_KEY_OPTIONAL: no key runs each time; a key runs once.
	for range 2 {
		require.NoError(t, call(ctx, e.client.Refund, req).err)
	}
	assert.Equal(t, 2, e.svc.runsOf("Refund"))
	kctx := withKey(ctx, "refund-1")
	first := call(kctx, e.client.Refund, req)
	again := call(kctx, e.client.Refund, req)
	require.NoError(t, again.err)
	assert.True(t, again.replayed())
	assert.Equal(t, first.resp.TransferId, again.resp.TransferId)
	assert.Equal(t, 3, e.svc.runsOf("Refund"))

	// NO_SIDE_EFFECTS, IDEMPOTENT and PARTICIPATION_NONE take no part: one
	// key and two different requests run twice, are never refused as a
	// mismatch, and leave no record.
	for _, m := range []struct {
		name string
		f    func(context.Context, *testpb.TransferRequest, ...grpc.CallOption) (*testpb.TransferResponse, error)
	}{{"Inspect", e.client.Inspect}, {"SetLimit", e.client.SetLimit}, {"Ping", e.client.Ping}} {
		key := "key-of-" + m.name
		kctx := withKey(ctx, key)
		for i := range 2 {
			a := call(kctx, m.f, &testpb.TransferRequest{Account: "acct_1", AmountCents: int64(100 + i)})
			require.NoError(t, a.err, m.name)
			assert.False(t, a.replayed(), m.name)
		}
		assert.Equal(t, 2, e.svc.runsOf(m.name), m.name)
		assert.Equal(t, idempotency.Absent, e.state(t, key), "%s writes no record", m.name)
	}

	// Replace is IDEMPOTENT, but its (idempotency.v1.method) comes first.
	a = call(ctx, e.client.Replace, req)
	require.Equal(t, codes.InvalidArgument, status.Code(a.err), "%v", a.err)
	rctx := withKey(ctx, "replace-1")
	first = call(rctx, e.client.Replace, req)
	again = call(rctx, e.client.Replace, req)
	require.NoError(t, again.err)
	assert.True(t, again.replayed())
	assert.Equal(t, first.resp.TransferId, again.resp.TransferId)
	assert.Equal(t, 1, e.svc.runsOf("Replace"))
}

// Precedence: the method's (idempotency.v1.method) first, then its
// idempotency_level, then the Go options.
func TestProtoComesBeforeGoOptions(t *testing.T) {
	ctx := testCtx(t)
	req := &testpb.TransferRequest{Account: "acct_1", AmountCents: 100}
	legacy := &testpb.LegacyRequest{Account: "acct_1", AmountCents: 100}

	t.Run("WithPolicy Skip", func(t *testing.T) {
		e := newPolicyEnv(t, newMemstore(t), []idempotency.Option{
			idempotency.WithPolicy(func(string) idempotency.Policy { return idempotency.Skip }),
		})
		a := call(ctx, e.client.Transfer, req)
		require.Equal(t, codes.InvalidArgument, status.Code(a.err), "the annotation wins: %v", a.err)
		kctx := withKey(ctx, "legacy-1")
		for range 2 {
			_, err := e.client.Legacy(kctx, legacy)
			require.NoError(t, err)
		}
		assert.Equal(t, 2, e.svc.runsOf("Legacy"), "a method the proto says nothing about follows WithPolicy")
	})

	t.Run("WithPolicy Required", func(t *testing.T) {
		e := newPolicyEnv(t, newMemstore(t), []idempotency.Option{
			idempotency.WithPolicy(func(string) idempotency.Policy { return idempotency.Required }),
		})
		for _, f := range []func(context.Context, *testpb.TransferRequest, ...grpc.CallOption) (*testpb.TransferResponse, error){
			e.client.Inspect, e.client.SetLimit, e.client.Ping, e.client.Refund,
		} {
			require.NoError(t, call(ctx, f, req).err, "idempotency_level and the annotation win")
		}
		_, err := e.client.Legacy(ctx, legacy)
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
		_, err = e.health.Check(ctx, &healthpb.HealthCheckRequest{})
		require.NoError(t, err, "WithPolicy is not asked about health checks")
	})

	t.Run("WithRequiredKey *", func(t *testing.T) {
		e := newPolicyEnv(t, newMemstore(t), []idempotency.Option{idempotency.WithRequiredKey("*")})
		require.NoError(t, call(ctx, e.client.Refund, req).err, "PARTICIPATION_KEY_OPTIONAL wins over *")
		require.NoError(t, call(ctx, e.client.Inspect, req).err)
		_, err := e.client.Legacy(ctx, legacy)
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
		_, err = e.health.Check(ctx, &healthpb.HealthCheckRequest{})
		require.NoError(t, err, "* does not name health checks")
	})

	t.Run("contradictions are refused", func(t *testing.T) {
		for _, c := range []struct {
			opt  idempotency.Option
			says string
		}{
			{idempotency.WithMethods(testpb.PolicyService_Inspect_FullMethodName), "NO_SIDE_EFFECTS"},
			{idempotency.WithMethods(testpb.PolicyService_SetLimit_FullMethodName), "IDEMPOTENT"},
			{idempotency.WithRequiredKey(testpb.PolicyService_Ping_FullMethodName), "PARTICIPATION_NONE"},
			{idempotency.WithRequiredKey(testpb.PolicyService_Refund_FullMethodName), "PARTICIPATION_KEY_OPTIONAL"},
		} {
			_, err := idempotency.NewServer(newMemstore(t), c.opt)
			require.Error(t, err, c.says)
			assert.Contains(t, err.Error(), c.says)
		}
		// Agreeing with the proto is fine.
		_, err := idempotency.NewServer(newMemstore(t),
			idempotency.WithMethods(testpb.PolicyService_Transfer_FullMethodName, testpb.PolicyService_Refund_FullMethodName),
			idempotency.WithRequiredKey(testpb.PolicyService_Transfer_FullMethodName, testpb.PolicyService_Replace_FullMethodName))
		require.NoError(t, err)
	})
}

// Health checks and reflection take no part unless named: keys or not, they
// write no record, and WithRequiredKey("*") does not refuse them.
func TestInfrastructureServicesTakeNoPart(t *testing.T) {
	ctx := testCtx(t)
	e := newPolicyEnv(t, newMemstore(t), []idempotency.Option{idempotency.WithRequiredKey("*")})
	kctx := withKey(ctx, "probe-1")
	for range 3 {
		var header metadata.MD
		resp, err := e.health.Check(kctx, &healthpb.HealthCheckRequest{}, grpc.Header(&header))
		require.NoError(t, err)
		assert.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.Status)
		assert.False(t, idempotency.IsReplayed(header))
	}
	assert.Equal(t, idempotency.Absent, e.state(t, "probe-1"), "a health check writes no record")
	_, err := e.health.Check(ctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err, "nor does it need a key")
	assert.Equal(t, []string{"probe-1", "probe-1", "probe-1", ""}, e.keys.of(healthpb.Health_Check_FullMethodName))

	rctx := withKey(ctx, "reflect-1")
	stream, err := reflectionpb.NewServerReflectionClient(e.conn).ServerReflectionInfo(rctx)
	require.NoError(t, err)
	require.NoError(t, stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}))
	resp, err := stream.Recv()
	require.NoError(t, err)
	assert.NotEmpty(t, resp.GetListServicesResponse().GetService())
	require.NoError(t, stream.CloseSend())
	_, err = stream.Recv()
	require.ErrorIs(t, err, io.EOF)
	assert.Equal(t, idempotency.Absent, e.state(t, "reflect-1"), "reflection writes no record")

	// Named, a health check takes part like any method.
	named := newPolicyEnv(t, newMemstore(t), []idempotency.Option{idempotency.WithMethods(healthpb.Health_Check_FullMethodName)})
	_, err = named.health.Check(kctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	assert.Equal(t, idempotency.Completed, named.state(t, "probe-1"))
}

// A method name that could never match a call is refused where it is set.
func TestMethodNamesAreCheckedWhereSet(t *testing.T) {
	for _, opt := range []idempotency.Option{
		idempotency.WithMethods("payments.v1.PaymentService/Charge"),
		idempotency.WithRequiredKey("payments.v1.PaymentService/Charge"),
		idempotency.WithMethods("/payments.v1.PaymentService.Charge"),
		idempotency.WithMethods("/payments.v1.PaymentService/Charge/"),
		idempotency.WithMethods("/payments.v1.PaymentService/"),
		idempotency.WithMethods(" /payments.v1.PaymentService/Charge"),
		idempotency.WithRequiredKey(""),
	} {
		_, err := idempotency.NewServer(newMemstore(t), opt)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "/package.Service/Method")
	}
	_, err := idempotency.NewServer(newMemstore(t),
		idempotency.WithMethods("/payments.v1.PaymentService/Charge", "/NoPackage/Method"),
		idempotency.WithRequiredKey("*"))
	require.NoError(t, err, "well-formed names are accepted, linked in or not")
}

// A request_id marked as the key supplies the key when the metadata has none.
func TestKeyFieldSuppliesTheKey(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newPolicyEnv(t, newStore(t), nil)
		ctx := testCtx(t)
		req := &testpb.TransferRequest{RequestId: "rid-1", Account: "acct_1", AmountCents: 100}

		first := call(ctx, e.client.Transfer, req)
		require.NoError(t, first.err)
		assert.False(t, first.replayed())
		again := call(ctx, e.client.Transfer, req)
		require.NoError(t, again.err)
		assert.True(t, again.replayed())
		assert.Equal(t, first.resp.TransferId, again.resp.TransferId)
		assert.Equal(t, 1, e.svc.runsOf("Transfer"))
		assert.Equal(t, []string{"rid-1"}, e.svc.seenRequestIDs(), "the handler sees the key field")
		assert.Equal(t, idempotency.Completed, e.state(t, "rid-1"), "the field's value is the key")

		// The same key in both places is one key.
		same := call(withKey(ctx, "rid-1"), e.client.Transfer, req)
		require.NoError(t, same.err)
		assert.True(t, same.replayed())

		// Reused for another request: refused as any key is.
		other := call(ctx, e.client.Transfer, &testpb.TransferRequest{RequestId: "rid-1", Account: "acct_1", AmountCents: 999})
		require.Equal(t, codes.FailedPrecondition, status.Code(other.err), "%v", other.err)

		// Different keys in the two places: refused, handler not run.
		both := call(withKey(ctx, "rid-2"), e.client.Transfer, &testpb.TransferRequest{RequestId: "rid-3", Account: "acct_1", AmountCents: 100})
		require.Equal(t, codes.InvalidArgument, status.Code(both.err), "%v", both.err)
		assert.Contains(t, status.Convert(both.err).Message(), "request_id")

		// A key the contract refuses is refused in a field too.
		bad := call(ctx, e.client.Transfer, &testpb.TransferRequest{RequestId: "has space", Account: "acct_1", AmountCents: 100})
		require.Equal(t, codes.InvalidArgument, status.Code(bad.err), "%v", bad.err)
		assert.Contains(t, status.Convert(bad.err).Message(), "request field request_id")
		assert.Equal(t, 1, e.svc.runsOf("Transfer"))

		// An optional key works from the field as well.
		r1 := call(ctx, e.client.Refund, &testpb.TransferRequest{RequestId: "refund-rid", AmountCents: 5})
		r2 := call(ctx, e.client.Refund, &testpb.TransferRequest{RequestId: "refund-rid", AmountCents: 5})
		require.NoError(t, r2.err)
		assert.True(t, r2.replayed())
		assert.Equal(t, r1.resp.TransferId, r2.resp.TransferId)
	})
}

// The key field is not part of the request's fingerprint: a retry that
// moves its key from the metadata into the field is the same request.
func TestKeyFieldIsLeftOutOfTheFingerprint(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), nil)
	ctx := withKey(testCtx(t), "k-fp")
	first := call(ctx, e.client.Transfer, &testpb.TransferRequest{Account: "acct_1", AmountCents: 100})
	require.NoError(t, first.err)
	again := call(ctx, e.client.Transfer, &testpb.TransferRequest{RequestId: "k-fp", Account: "acct_1", AmountCents: 100})
	require.NoError(t, again.err)
	assert.True(t, again.replayed())
	assert.Equal(t, first.resp.TransferId, again.resp.TransferId)
}

// A server stream takes its key from the request; a client stream needs the
// metadata.
func TestKeyFieldInStreams(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), nil)
	ctx := testCtx(t)
	steps := func(req *testpb.TransferRequest) ([]string, bool) {
		t.Helper()
		stream, err := e.client.TransferSteps(ctx, req)
		require.NoError(t, err)
		var ids []string
		for {
			resp, err := stream.Recv()
			if err == io.EOF {
				break
			}
			require.NoError(t, err)
			ids = append(ids, resp.TransferId)
		}
		header, err := stream.Header()
		require.NoError(t, err)
		return ids, idempotency.IsReplayed(header)
	}
	req := &testpb.TransferRequest{RequestId: "steps-1", Account: "acct_1", AmountCents: 300, Count: 3}
	first, replayed := steps(req)
	require.Len(t, first, 3)
	assert.False(t, replayed)
	again, replayed := steps(req)
	assert.True(t, replayed)
	assert.Equal(t, first, again)
	assert.Equal(t, 1, e.svc.runsOf("TransferSteps"))

	stream, err := e.client.TransferSteps(ctx, &testpb.TransferRequest{Account: "acct_1", AmountCents: 300, Count: 3})
	require.NoError(t, err)
	_, err = stream.Recv()
	require.Equal(t, codes.InvalidArgument, status.Code(err), "no key at all: %v", err)

	batch := func(ctx context.Context) error {
		stream, err := e.client.TransferBatch(ctx)
		require.NoError(t, err)
		for range 2 {
			require.NoError(t, stream.Send(&testpb.TransferRequest{RequestId: "batch-rid", Account: "acct_1", AmountCents: 1}))
		}
		_, err = stream.CloseAndRecv()
		return err
	}
	err = batch(ctx)
	require.Equal(t, codes.InvalidArgument, status.Code(err), "a client stream's key is in its metadata: %v", err)
	require.NoError(t, batch(withKey(ctx, "batch-1")))
	assert.Equal(t, 1, e.svc.runsOf("TransferBatch"))
}

// Fields marked fingerprint_exclude, wherever their message appears, are
// left out of the fingerprint: a retry that differs only there replays.
func TestFingerprintExclusions(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), nil)
	ctx := withKey(testCtx(t), "fp-ex")
	base := &testpb.TransferRequest{
		Account: "acct_1", AmountCents: 100, TraceNote: "first try",
		Sender: &testpb.Sender{Name: "app", SentAt: "10:00:00"},
		Hops:   []*testpb.Sender{{Name: "edge", SentAt: "10:00:01"}, {Name: "core", SentAt: "10:00:02"}},
	}
	first := call(ctx, e.client.Transfer, base)
	require.NoError(t, first.err)

	retry := proto.Clone(base).(*testpb.TransferRequest)
	retry.TraceNote = "retry after a timeout"
	retry.Sender.SentAt = "10:00:05"
	retry.Hops[0].SentAt = "10:00:06"
	retry.Hops[1].SentAt = ""
	again := call(ctx, e.client.Transfer, retry)
	require.NoError(t, again.err)
	assert.True(t, again.replayed())
	assert.Equal(t, first.resp.TransferId, again.resp.TransferId)
	assert.Equal(t, "first try", base.TraceNote, "the caller's request is not changed")

	for name, change := range map[string]func(*testpb.TransferRequest){
		"sender.name":  func(r *testpb.TransferRequest) { r.Sender.Name = "other" },
		"hops[1].name": func(r *testpb.TransferRequest) { r.Hops[1].Name = "other" },
		"hops":         func(r *testpb.TransferRequest) { r.Hops = r.Hops[:1] },
		"account":      func(r *testpb.TransferRequest) { r.Account = "acct_2" },
	} {
		other := proto.Clone(base).(*testpb.TransferRequest)
		change(other)
		a := call(ctx, e.client.Transfer, other)
		require.Equal(t, codes.FailedPrecondition, status.Code(a.err), "%s changes the request: %v", name, a.err)
	}
	assert.Equal(t, 1, e.svc.runsOf("Transfer"))
}

// retentionStore remembers the retention of every Complete.
type retentionStore struct {
	idempotency.Store
	retentions chan time.Duration
}

func (s *retentionStore) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	s.retentions <- retention
	return s.Store.Complete(ctx, key, token, record, retention)
}

// A method's retention from the proto replaces the server's.
func TestRetentionFromProto(t *testing.T) {
	store := &retentionStore{Store: newMemstore(t), retentions: make(chan time.Duration, 10)}
	e := newPolicyEnv(t, store, []idempotency.Option{idempotency.WithRetention(48 * time.Hour)})
	ctx := testCtx(t)
	require.NoError(t, call(withKey(ctx, "ret-1"), e.client.Transfer, &testpb.TransferRequest{AmountCents: 1}).err)
	require.NoError(t, call(withKey(ctx, "ret-2"), e.client.Refund, &testpb.TransferRequest{AmountCents: 1}).err)
	assert.Equal(t, time.Hour, <-store.retentions, "Transfer's (idempotency.v1.method).retention")
	assert.Equal(t, 48*time.Hour, <-store.retentions, "Refund declares none: WithRetention")

	for key, want := range map[string]time.Duration{"ret-1": time.Hour, "ret-2": 48 * time.Hour} {
		entry, err := store.Lookup(ctx, idempotency.StoreKey("", key))
		require.NoError(t, err)
		var rec idempotencyv1.Record
		require.NoError(t, proto.Unmarshal(entry.Record, &rec))
		assert.Equal(t, want, rec.ExpiresAt.AsTime().Sub(rec.CreatedAt.AsTime()), key)
	}
}
