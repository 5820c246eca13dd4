package idempotency_test

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
)

// transfers is the PolicyService of the policy tests: every execution makes
// a fresh transfer_id, and the service remembers what each execution saw.
type transfers struct {
	testpb.UnimplementedPolicyServiceServer
	// failFirst makes the first n executions fail with Unavailable.
	failFirst atomic.Int64

	mu         sync.Mutex
	runs       map[string]int // by method name
	requestIDs []string       // the request_id each execution saw, in order
}

func (t *transfers) run(ctx context.Context, method, requestID string) error {
	t.mu.Lock()
	t.runs[method]++
	t.requestIDs = append(t.requestIDs, requestID)
	t.mu.Unlock()
	if t.failFirst.Add(-1) >= 0 {
		return status.Error(codes.Unavailable, "ledger busy, try again")
	}
	return ctx.Err()
}

func (t *transfers) runsOf(method string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.runs[method]
}

func (t *transfers) seenRequestIDs() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.requestIDs...)
}

func (t *transfers) transfer(ctx context.Context, method string, req *testpb.TransferRequest) (*testpb.TransferResponse, error) {
	if err := t.run(ctx, method, req.GetRequestId()); err != nil {
		return nil, err
	}
	return &testpb.TransferResponse{TransferId: chargeID(), RequestId: req.GetRequestId(), AmountCents: req.GetAmountCents()}, nil
}

func (t *transfers) Transfer(ctx context.Context, req *testpb.TransferRequest) (*testpb.TransferResponse, error) {
	return t.transfer(ctx, "Transfer", req)
}

func (t *transfers) Refund(ctx context.Context, req *testpb.TransferRequest) (*testpb.TransferResponse, error) {
	return t.transfer(ctx, "Refund", req)
}

func (t *transfers) Inspect(ctx context.Context, req *testpb.TransferRequest) (*testpb.TransferResponse, error) {
	return t.transfer(ctx, "Inspect", req)
}

func (t *transfers) SetLimit(ctx context.Context, req *testpb.TransferRequest) (*testpb.TransferResponse, error) {
	return t.transfer(ctx, "SetLimit", req)
}

func (t *transfers) Replace(ctx context.Context, req *testpb.TransferRequest) (*testpb.TransferResponse, error) {
	return t.transfer(ctx, "Replace", req)
}

func (t *transfers) Ping(ctx context.Context, req *testpb.TransferRequest) (*testpb.TransferResponse, error) {
	return t.transfer(ctx, "Ping", req)
}

func (t *transfers) Legacy(ctx context.Context, req *testpb.LegacyRequest) (*testpb.TransferResponse, error) {
	if err := t.run(ctx, "Legacy", req.GetRequestId()); err != nil {
		return nil, err
	}
	return &testpb.TransferResponse{TransferId: chargeID(), RequestId: req.GetRequestId(), AmountCents: req.GetAmountCents()}, nil
}

func (t *transfers) TransferSteps(req *testpb.TransferRequest, ss grpc.ServerStreamingServer[testpb.TransferResponse]) error {
	if err := t.run(ss.Context(), "TransferSteps", req.GetRequestId()); err != nil {
		return err
	}
	for range req.GetCount() {
		if err := ss.Send(&testpb.TransferResponse{TransferId: chargeID(), RequestId: req.GetRequestId(), AmountCents: req.GetAmountCents()}); err != nil {
			return err
		}
	}
	return nil
}

func (t *transfers) TransferBatch(ss grpc.ClientStreamingServer[testpb.TransferRequest, testpb.TransferResponse]) error {
	if err := t.run(ss.Context(), "TransferBatch", ""); err != nil {
		return err
	}
	var total int64
	for {
		req, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		total += req.GetAmountCents()
	}
	return ss.SendAndClose(&testpb.TransferResponse{TransferId: chargeID(), AmountCents: total})
}

// keyLog records the idempotency-key metadata of every call a server
// receives, before the idempotency interceptor sees it.
type keyLog struct {
	mu   sync.Mutex
	keys map[string][]string // full method name -> one entry per call, "" without a key
}

func (l *keyLog) record(ctx context.Context, method string) {
	key := ""
	if v := metadata.ValueFromIncomingContext(ctx, idempotency.KeyHeader); len(v) > 0 {
		key = v[0]
	}
	l.mu.Lock()
	l.keys[method] = append(l.keys[method], key)
	l.mu.Unlock()
}

func (l *keyLog) of(method string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.keys[method]...)
}

// policyEnv is a server with the PolicyService, the PaymentService, the
// standard health service and reflection, behind a key log and the
// idempotency interceptors, on bufconn.
type policyEnv struct {
	svc      *transfers
	payments *payments
	store    idempotency.Store
	keys     *keyLog
	conn     *grpc.ClientConn
	client   testpb.PolicyServiceClient
	pay      testpb.PaymentServiceClient
	health   healthpb.HealthClient
}

func newPolicyEnv(t testing.TB, store idempotency.Store, server []idempotency.Option, client ...grpc.DialOption) *policyEnv {
	t.Helper()
	idem, err := idempotency.NewServer(store, server...)
	require.NoError(t, err)
	e := &policyEnv{svc: &transfers{runs: map[string]int{}}, payments: &payments{}, store: store, keys: &keyLog{keys: map[string][]string{}}}
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			e.keys.record(ctx, info.FullMethod)
			return h(ctx, req)
		}, idem.UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			e.keys.record(ss.Context(), info.FullMethod)
			return h(srv, ss)
		}, idem.StreamServerInterceptor()),
	)
	testpb.RegisterPolicyServiceServer(srv, e.svc)
	testpb.RegisterPaymentServiceServer(srv, e.payments)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	reflection.Register(srv)

	lis := bufconn.Listen(1 << 20)
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet", append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, client...)...)
	require.NoError(t, err)
	e.conn = conn
	e.client = testpb.NewPolicyServiceClient(conn)
	e.pay = testpb.NewPaymentServiceClient(conn)
	e.health = healthpb.NewHealthClient(conn)
	t.Cleanup(func() {
		conn.Close()
		hs.Shutdown()
		srv.Stop()
	})
	return e
}

// state returns the state of key (in the empty scope) in the env's store.
func (e *policyEnv) state(t testing.TB, key string) idempotency.State {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	entry, err := e.store.Lookup(ctx, idempotency.StoreKey("", key))
	require.NoError(t, err)
	return entry.State
}

// transferAnswer is what one unary PolicyService call got.
type transferAnswer struct {
	resp   *testpb.TransferResponse
	err    error
	header metadata.MD
}

func (a transferAnswer) replayed() bool { return idempotency.IsReplayed(a.header) }

func call(ctx context.Context, f func(context.Context, *testpb.TransferRequest, ...grpc.CallOption) (*testpb.TransferResponse, error), req *testpb.TransferRequest, opts ...grpc.CallOption) transferAnswer {
	var a transferAnswer
	a.resp, a.err = f(ctx, req, append(opts, grpc.Header(&a.header))...)
	return a
}
