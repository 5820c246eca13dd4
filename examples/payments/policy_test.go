package payments_test

import (
	"context"
	"net"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/examples/payments/internal/app"
	"github.com/grpcidem/idempotency/examples/payments/service"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"

	"github.com/grpcidem/idempotency/memstore"
)

// exampleServer is the example server (app.NewServer: its interceptor chain,
// health and reflection) on loopback TCP, with a store and a service the
// test can look into.
type exampleServer struct {
	addr  string
	store idempotency.Store
	svc   *service.Service
}

func startExample(t *testing.T) *exampleServer {
	t.Helper()
	store := memstore.New()
	svc := service.New()
	srv, err := app.NewServer(store, svc, app.ServerConfig{})
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Stop()
		store.Close()
	})
	return &exampleServer{addr: lis.Addr().String(), store: store, svc: svc}
}

// state returns the state of key for the example's default tenant.
func (s *exampleServer) state(t *testing.T, key string) idempotency.State {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e, err := s.store.Lookup(ctx, idempotency.StoreKey("public", key))
	require.NoError(t, err)
	return e.State
}

func policyCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// Two Charge calls with the same request_id and no metadata key return the
// same charge, the second marked replayed.
func TestChargeKeyedByRequestID(t *testing.T) {
	s := startExample(t)
	client := paymentsv1.NewPaymentServiceClient(dial(t, s.addr))
	ctx := policyCtx(t)
	req := &paymentsv1.ChargeRequest{RequestId: "7b0c6a52-3f7e-4c8e-9d51-2f0e3b9a6c11", Account: "acct_1", AmountCents: 1250, Currency: "EUR"}

	var h1, h2 metadata.MD
	first, err := client.Charge(ctx, req, grpc.Header(&h1))
	require.NoError(t, err)
	again, err := client.Charge(ctx, req, grpc.Header(&h2))
	require.NoError(t, err)
	assert.False(t, idempotency.IsReplayed(h1))
	assert.True(t, idempotency.IsReplayed(h2))
	assert.Equal(t, first.GetChargeId(), again.GetChargeId())
	assert.EqualValues(t, 1, s.svc.StatsOf(paymentsv1.PaymentService_Charge_FullMethodName).Executions)
	assert.Equal(t, idempotency.Completed, s.state(t, req.RequestId))

	other := proto.Clone(req).(*paymentsv1.ChargeRequest)
	other.AmountCents = 999
	_, err = client.Charge(ctx, other)
	require.Equal(t, codes.FailedPrecondition, status.Code(err), "the same request_id for another charge: %v", err)
}

// GetCharge is NO_SIDE_EFFECTS: with one key and two different requests it
// runs twice, is never refused as a mismatch, and leaves no record.
func TestGetChargeTakesNoPart(t *testing.T) {
	s := startExample(t)
	client := paymentsv1.NewPaymentServiceClient(dial(t, s.addr))
	ctx := policyCtx(t)
	made, err := client.Charge(ctx, &paymentsv1.ChargeRequest{RequestId: "charge-1", Account: "acct_1", AmountCents: 500, Currency: "EUR"})
	require.NoError(t, err)

	kctx := metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, "read-1")
	var header metadata.MD
	got, err := client.GetCharge(kctx, &paymentsv1.GetChargeRequest{ChargeId: made.GetChargeId()}, grpc.Header(&header))
	require.NoError(t, err)
	assert.True(t, proto.Equal(made, got), "GetCharge returns the charge the server made")
	assert.False(t, idempotency.IsReplayed(header))

	_, err = client.GetCharge(kctx, &paymentsv1.GetChargeRequest{ChargeId: "ch_000000000000000000000000"})
	require.Equal(t, codes.NotFound, status.Code(err), "another request with the same key runs, and is not a mismatch: %v", err)
	assert.EqualValues(t, 2, s.svc.StatsOf(paymentsv1.PaymentService_GetCharge_FullMethodName).Runs)
	assert.Equal(t, idempotency.Absent, s.state(t, "read-1"))
}

// The standard health service is registered, and a health check with a
// key writes no record.
func TestHealthCheckWritesNoRecord(t *testing.T) {
	s := startExample(t)
	health := healthpb.NewHealthClient(dial(t, s.addr))
	ctx := metadata.AppendToOutgoingContext(policyCtx(t), idempotency.KeyHeader, "probe-1")
	for range 3 {
		resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		assert.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.GetStatus())
	}
	assert.Equal(t, idempotency.Absent, s.state(t, "probe-1"))
}

// outgoingKeys records the idempotency-key metadata of every call, below
// the client's idempotency interceptors, where the wire is.
type outgoingKeys struct {
	mu   sync.Mutex
	keys map[string][]string
}

func (o *outgoingKeys) unary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	md, _ := metadata.FromOutgoingContext(ctx)
	o.mu.Lock()
	o.keys[method] = append(o.keys[method], md.Get(idempotency.KeyHeader)...)
	o.mu.Unlock()
	return invoker(ctx, method, req, reply, cc, opts...)
}

func (o *outgoingKeys) of(method string) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.keys[method]
}

var uuid4 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// A client with the interceptors (app.Dial) sends no key on GetCharge or
// health checks, and gives Charge its key in request_id.
func TestClientKeysOnlyCharges(t *testing.T) {
	s := startExample(t)
	sent := &outgoingKeys{keys: map[string][]string{}}
	cc, err := app.Dial(s.addr, 3, grpc.WithChainUnaryInterceptor(sent.unary))
	require.NoError(t, err)
	t.Cleanup(func() { cc.Close() })
	client := paymentsv1.NewPaymentServiceClient(cc)
	ctx := policyCtx(t)

	req := &paymentsv1.ChargeRequest{Account: "acct_1", AmountCents: 700, Currency: "EUR"}
	made, err := client.Charge(ctx, req)
	require.NoError(t, err)
	assert.Regexp(t, uuid4, req.GetRequestId(), "the interceptor filled request_id")
	assert.Empty(t, sent.of(paymentsv1.PaymentService_Charge_FullMethodName), "the key went in request_id, not the metadata")
	assert.Equal(t, idempotency.Completed, s.state(t, req.GetRequestId()))

	got, err := client.GetCharge(ctx, &paymentsv1.GetChargeRequest{ChargeId: made.GetChargeId()})
	require.NoError(t, err)
	assert.Equal(t, made.GetChargeId(), got.GetChargeId())
	_, err = healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	assert.Empty(t, sent.of(paymentsv1.PaymentService_GetCharge_FullMethodName), "no key on GetCharge")
	assert.Empty(t, sent.of(healthpb.Health_Check_FullMethodName), "no key on health checks")
}
