package idemconnect_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/idemconnect"
	"github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/internal/testpb/testpbconnect"
	"github.com/grpcidem/idempotency/memstore"
)

// ledger counts executions per key across every replica and adapter of a
// test, and numbers the charges it makes.
type ledger struct {
	mu    sync.Mutex
	runs  map[string]int
	seq   atomic.Int64
	delay time.Duration
}

func newLedger() *ledger { return &ledger{runs: map[string]int{}} }

func (l *ledger) run(ctx context.Context) string {
	key := "<none>"
	if e := idempotency.ExecutionFromContext(ctx); e != nil {
		key = e.Key
	}
	l.mu.Lock()
	l.runs[key]++
	l.mu.Unlock()
	if l.delay > 0 {
		time.Sleep(l.delay)
	}
	return fmt.Sprintf("ch_%d", l.seq.Add(1))
}

func (l *ledger) count(key string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.runs[key]
}

// connectPayments is the connect implementation of the tests' service. A
// charge to account "declined" fails with a cacheable InvalidArgument that
// has a detail and metadata.
type connectPayments struct{ l *ledger }

func (p connectPayments) Charge(ctx context.Context, req *connect.Request[testpb.ChargeRequest]) (*connect.Response[testpb.ChargeResponse], error) {
	id := p.l.run(ctx)
	if req.Msg.Account == "declined" {
		ce := connect.NewError(connect.CodeInvalidArgument, errors.New("card declined"))
		d, err := connect.NewErrorDetail(&testpb.ChargeResponse{ChargeId: id})
		if err != nil {
			return nil, err
		}
		ce.AddDetail(d)
		ce.Meta().Set("X-Decline-Reason", "insufficient funds")
		return nil, ce
	}
	if req.Msg.Account == "grpc-style" {
		// A gRPC service served as a connect handler sets metadata the
		// grpc-go way.
		if err := grpc.SetHeader(ctx, metadata.Pairs("x-style", "grpc")); err != nil {
			return nil, err
		}
		if err := grpc.SetTrailer(ctx, metadata.Pairs("x-style-trailer", "grpc")); err != nil {
			return nil, err
		}
	}
	resp := connect.NewResponse(&testpb.ChargeResponse{ChargeId: id, Account: req.Msg.Account, AmountCents: req.Msg.AmountCents, Currency: req.Msg.Currency})
	if req.Msg.Account == "sets-replayed" {
		// A handler that sets the replay header itself, both ways.
		resp.Header().Set("Idempotency-Replayed", "true")
		if info, ok := connect.CallInfoForHandlerContext(ctx); ok {
			info.ResponseHeader().Set("Idempotency-Replayed", "yes")
		}
	}
	resp.Header().Set("X-Charge-Id", id)
	resp.Header().Set("X-Receipt-Bin", connect.EncodeBinaryHeader([]byte{0, 1, 2, 0xff}))
	resp.Trailer().Set("X-Settled", "yes")
	return resp, nil
}

func (p connectPayments) ChargeInstallments(ctx context.Context, req *connect.Request[testpb.InstallmentsRequest], ss *connect.ServerStream[testpb.ChargeResponse]) error {
	id := p.l.run(ctx)
	ss.ResponseHeader().Set("X-Charge-Id", id)
	if req.Msg.Account == "sets-replayed" {
		ss.ResponseHeader().Set("Idempotency-Replayed", "true")
	}
	for i := int32(0); i < req.Msg.Count; i++ {
		if err := ss.Send(&testpb.ChargeResponse{ChargeId: fmt.Sprintf("%s/%d", id, i), Account: req.Msg.Account, AmountCents: req.Msg.AmountCents / int64(req.Msg.Count)}); err != nil {
			return err
		}
	}
	ss.ResponseTrailer().Set("X-Settled", "yes")
	return nil
}

func (p connectPayments) ChargeBatch(ctx context.Context, cs *connect.ClientStream[testpb.ChargeRequest]) (*connect.Response[testpb.BatchResponse], error) {
	id := p.l.run(ctx)
	out := &testpb.BatchResponse{}
	for cs.Receive() {
		out.Charges = append(out.Charges, &testpb.ChargeResponse{ChargeId: fmt.Sprintf("%s/%d", id, len(out.Charges)), AmountCents: cs.Msg().AmountCents})
	}
	if err := cs.Err(); err != nil {
		return nil, err
	}
	resp := connect.NewResponse(out)
	resp.Header().Set("X-Charge-Id", id)
	return resp, nil
}

func (p connectPayments) ChargeInteractive(ctx context.Context, bs *connect.BidiStream[testpb.ChargeRequest, testpb.ChargeResponse]) error {
	id := p.l.run(ctx)
	for n := 0; ; n++ {
		req, err := bs.Receive()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := bs.Send(&testpb.ChargeResponse{ChargeId: fmt.Sprintf("%s/%d", id, n), AmountCents: req.AmountCents}); err != nil {
			return err
		}
	}
}

// grpcPayments is the grpc-go implementation of Charge, with the same
// outcome as connectPayments', for replicas of both kinds.
type grpcPayments struct {
	testpb.UnimplementedPaymentServiceServer
	l *ledger
}

func (p grpcPayments) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	id := p.l.run(ctx)
	_ = grpc.SetHeader(ctx, metadata.Pairs("x-charge-id", id, "x-receipt-bin", string([]byte{0, 1, 2, 0xff})))
	_ = grpc.SetTrailer(ctx, metadata.Pairs("x-settled", "yes"))
	return &testpb.ChargeResponse{ChargeId: id, Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}, nil
}

func newServer(t *testing.T, store idempotency.Store, opts ...idempotency.Option) *idempotency.Server {
	t.Helper()
	srv, err := idempotency.NewServer(store, opts...)
	require.NoError(t, err)
	return srv
}

// serveConnect serves the tests' services through srv's connect
// interceptor on an HTTP/2-capable TLS test server, wrapped by mw if given.
func serveConnect(t *testing.T, srv *idempotency.Server, l *ledger, mw func(http.Handler) http.Handler) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	mux.Handle(testpbconnect.NewPaymentServiceHandler(connectPayments{l}, connect.WithInterceptors(idemconnect.NewInterceptor(srv))))
	mux.Handle(testpbconnect.NewPolicyServiceHandler(policyService{l}, connect.WithInterceptors(idemconnect.NewInterceptor(srv))))
	var h http.Handler = mux
	if mw != nil {
		h = mw(mux)
	}
	hs := httptest.NewUnstartedServer(h)
	hs.EnableHTTP2 = true
	hs.StartTLS()
	t.Cleanup(hs.Close)
	return hs
}

var protocols = []struct {
	name string
	opt  connect.ClientOption
}{
	{"connect", connect.WithProtoJSON()},
	{"grpc", connect.WithGRPC()},
	{"grpcweb", connect.WithGRPCWeb()},
}

func stores(t *testing.T) map[string]idempotency.Store {
	t.Helper()
	mem := memstore.New()
	t.Cleanup(func() { _ = mem.Close() })
	bolt, err := boltstore.Open(filepath.Join(t.TempDir(), "idem.db"))
	require.NoError(t, err)
	t.Cleanup(func() { _ = bolt.Close() })
	return map[string]idempotency.Store{"memory": mem, "bolt": bolt}
}

func TestUnaryOverEveryProtocol(t *testing.T) {
	for storeName, store := range stores(t) {
		l := newLedger()
		hs := serveConnect(t, newServer(t, store), l, nil)
		for _, p := range protocols {
			t.Run(storeName+"/"+p.name, func(t *testing.T) {
				client := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL, p.opt)
				key := "k-" + storeName + "-" + p.name
				call := func() *connect.Response[testpb.ChargeResponse] {
					req := connect.NewRequest(&testpb.ChargeRequest{Account: "a", AmountCents: 100, Currency: "EUR"})
					req.Header().Set("Idempotency-Key", key)
					resp, err := client.Charge(context.Background(), req)
					require.NoError(t, err)
					return resp
				}
				first, second := call(), call()
				assert.Equal(t, 1, l.count(key), "the handler ran more than once")
				assert.Equal(t, first.Msg.ChargeId, second.Msg.ChargeId)
				assert.False(t, idemconnect.IsReplayed(first.Header()), "a first execution is not a replay")
				assert.True(t, idemconnect.IsReplayed(second.Header()))
				assert.Equal(t, first.Header().Get("X-Charge-Id"), second.Header().Get("X-Charge-Id"))
				assert.Equal(t, first.Header().Get("X-Receipt-Bin"), second.Header().Get("X-Receipt-Bin"))
				assert.Equal(t, "yes", second.Trailer().Get("X-Settled"))

				// The same key for another request.
				req := connect.NewRequest(&testpb.ChargeRequest{Account: "a", AmountCents: 999, Currency: "EUR"})
				req.Header().Set("Idempotency-Key", key)
				_, err := client.Charge(context.Background(), req)
				assert.Equal(t, connect.CodeFailedPrecondition, connect.CodeOf(err), "%v", err)
				assert.Equal(t, 1, l.count(key))
			})
		}
	}
}

// TestFirstExecutionNeverLooksReplayed: the replay header a handler sets
// itself is not sent, on the first execution or in a replay (which carries
// exactly "true").
func TestFirstExecutionNeverLooksReplayed(t *testing.T) {
	l := newLedger()
	hs := serveConnect(t, newServer(t, memstore.New()), l, nil)
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			client := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL, p.opt)
			for i := range 2 {
				req := connect.NewRequest(&testpb.ChargeRequest{Account: "sets-replayed", AmountCents: 1})
				req.Header().Set("Idempotency-Key", "sets-replayed-"+p.name)
				resp, err := client.Charge(context.Background(), req)
				require.NoError(t, err)
				want := []string(nil)
				if i == 1 {
					want = []string{"true"}
				}
				assert.Equal(t, want, resp.Header().Values("Idempotency-Replayed"), "attempt %d", i)
			}
			assert.Equal(t, 1, l.count("sets-replayed-"+p.name))

			for i := range 2 {
				req := connect.NewRequest(&testpb.InstallmentsRequest{Account: "sets-replayed", AmountCents: 2, Count: 2})
				req.Header().Set("Idempotency-Key", "sets-replayed-stream-"+p.name)
				st, err := client.ChargeInstallments(context.Background(), req)
				require.NoError(t, err)
				n := 0
				for st.Receive() {
					n++
				}
				require.NoError(t, st.Err())
				assert.Equal(t, 2, n)
				want := []string(nil)
				if i == 1 {
					want = []string{"true"}
				}
				assert.Equal(t, want, st.ResponseHeader().Values("Idempotency-Replayed"), "stream attempt %d", i)
				require.NoError(t, st.Close())
			}
			assert.Equal(t, 1, l.count("sets-replayed-stream-"+p.name))
		})
	}
}

// TestGRPCStyleMetadata: a handler that sets metadata with grpc.SetHeader
// and grpc.SetTrailer (a gRPC service served through connect) has it sent on
// the first execution and replayed.
func TestGRPCStyleMetadata(t *testing.T) {
	l := newLedger()
	hs := serveConnect(t, newServer(t, memstore.New()), l, nil)
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			client := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL, p.opt)
			for i := range 2 {
				req := connect.NewRequest(&testpb.ChargeRequest{Account: "grpc-style", AmountCents: 1})
				req.Header().Set("Idempotency-Key", "style-"+p.name)
				resp, err := client.Charge(context.Background(), req)
				require.NoError(t, err)
				assert.Equal(t, i == 1, idemconnect.IsReplayed(resp.Header()))
				assert.Equal(t, "grpc", resp.Header().Get("X-Style"), "attempt %d", i)
				assert.Equal(t, "grpc", resp.Trailer().Get("X-Style-Trailer"), "attempt %d", i)
			}
			assert.Equal(t, 1, l.count("style-"+p.name))
		})
	}
}

func TestErrorOutcomeReplayed(t *testing.T) {
	l := newLedger()
	hs := serveConnect(t, newServer(t, memstore.New()), l, nil)
	for _, p := range protocols {
		t.Run(p.name, func(t *testing.T) {
			client := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL, p.opt)
			key := "declined-" + p.name
			var errs []*connect.Error
			for range 2 {
				req := connect.NewRequest(&testpb.ChargeRequest{Account: "declined", AmountCents: 100})
				req.Header().Set("Idempotency-Key", key)
				_, err := client.Charge(context.Background(), req)
				var ce *connect.Error
				require.ErrorAs(t, err, &ce)
				errs = append(errs, ce)
			}
			assert.Equal(t, 1, l.count(key))
			for _, ce := range errs {
				assert.Equal(t, connect.CodeInvalidArgument, ce.Code())
				assert.Equal(t, "card declined", ce.Message())
				assert.Equal(t, "insufficient funds", ce.Meta().Get("X-Decline-Reason"))
				require.Len(t, ce.Details(), 1)
				v, err := ce.Details()[0].Value()
				require.NoError(t, err)
				assert.Equal(t, errs[0].Details()[0].Bytes(), ce.Details()[0].Bytes())
				assert.IsType(t, &testpb.ChargeResponse{}, v)
			}
			assert.True(t, idemconnect.IsReplayed(errs[1].Meta()), "the replayed error carries the replay header")
		})
	}
}

// TestPlainHTTP is what a user does with curl: a JSON POST with an
// Idempotency-Key header, twice.
func TestPlainHTTP(t *testing.T) {
	l := newLedger()
	hs := serveConnect(t, newServer(t, memstore.New()), l, nil)
	post := func(key, body string) (*http.Response, map[string]any) {
		req, err := http.NewRequest(http.MethodPost, hs.URL+"/idempotency.testing.v1.PaymentService/Charge", strings.NewReader(body))
		require.NoError(t, err)
		req.Header.Set("Content-Type", "application/json")
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		resp, err := hs.Client().Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		var out map[string]any
		require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
		return resp, out
	}
	body := `{"account":"a","amountCents":100,"currency":"EUR"}`
	r1, b1 := post("k1", body)
	r2, b2 := post("k1", body)
	require.Equal(t, http.StatusOK, r1.StatusCode, "%v", b1)
	require.Equal(t, http.StatusOK, r2.StatusCode, "%v", b2)
	assert.Equal(t, b1["chargeId"], b2["chargeId"])
	assert.Empty(t, r1.Header.Get("Idempotency-Replayed"))
	assert.Equal(t, "true", r2.Header.Get("Idempotency-Replayed"))
	assert.Equal(t, 1, l.count("k1"))

	// The contract's refusals, as HTTP statuses and connect error codes.
	for _, tc := range []struct {
		name, key, body string
		status          int
		code            string
	}{
		{"reused key", "k1", `{"account":"a","amountCents":5,"currency":"EUR"}`, http.StatusBadRequest, "failed_precondition"},
		{"key with a space", "k 2", body, http.StatusBadRequest, "invalid_argument"},
		{"key too long", strings.Repeat("k", 256), body, http.StatusBadRequest, "invalid_argument"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, b := post(tc.key, tc.body)
			assert.Equal(t, tc.status, r.StatusCode, "%v", b)
			assert.Equal(t, tc.code, b["code"])
			assert.Contains(t, b["message"], "idempotency-key")
		})
	}
	assert.Equal(t, 1, l.count("k1"))
}

// TestReplicasOfBothKindsShareAStore runs a grpc-go replica and a connect
// replica on one store: each replays what the other executed, byte for
// byte.
func TestReplicasOfBothKindsShareAStore(t *testing.T) {
	for storeName, store := range stores(t) {
		t.Run(storeName, func(t *testing.T) {
			l := newLedger()
			hs := serveConnect(t, newServer(t, store), l, nil)
			gc := grpcReplica(t, newServer(t, store), l)
			cc := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL, connect.WithGRPC())

			viaGRPC := func(key string) (*testpb.ChargeResponse, metadata.MD, metadata.MD) {
				var h, tr metadata.MD
				resp, err := gc.Charge(metadata.AppendToOutgoingContext(context.Background(), "idempotency-key", key),
					&testpb.ChargeRequest{Account: "a", AmountCents: 100, Currency: "EUR"}, grpc.Header(&h), grpc.Trailer(&tr))
				require.NoError(t, err)
				return resp, h, tr
			}
			viaConnect := func(key string) *connect.Response[testpb.ChargeResponse] {
				req := connect.NewRequest(&testpb.ChargeRequest{Account: "a", AmountCents: 100, Currency: "EUR"})
				req.Header().Set("Idempotency-Key", key)
				resp, err := cc.Charge(context.Background(), req)
				require.NoError(t, err)
				return resp
			}

			// grpc-go first, connect replays.
			g, gh, gt := viaGRPC("g1")
			c := viaConnect("g1")
			assert.Equal(t, g.ChargeId, c.Msg.ChargeId)
			assert.True(t, idemconnect.IsReplayed(c.Header()))
			assert.Equal(t, gh.Get("x-charge-id")[0], c.Header().Get("X-Charge-Id"))
			bin, err := connect.DecodeBinaryHeader(c.Header().Get("X-Receipt-Bin"))
			require.NoError(t, err)
			assert.Equal(t, gh.Get("x-receipt-bin")[0], string(bin))
			assert.Equal(t, gt.Get("x-settled"), []string{c.Trailer().Get("X-Settled")})
			assert.Equal(t, 1, l.count("g1"))

			// connect first, grpc-go replays.
			c = viaConnect("c1")
			g, gh, gt = viaGRPC("c1")
			assert.Equal(t, c.Msg.ChargeId, g.ChargeId)
			assert.True(t, idempotency.IsReplayed(gh))
			assert.Equal(t, []string{c.Header().Get("X-Charge-Id")}, gh.Get("x-charge-id"))
			assert.Equal(t, []string{string([]byte{0, 1, 2, 0xff})}, gh.Get("x-receipt-bin"))
			assert.Equal(t, []string{"yes"}, gt.Get("x-settled"))
			assert.Equal(t, 1, l.count("c1"))
		})
	}
}

func grpcReplica(t *testing.T, srv *idempotency.Server, l *ledger) testpb.PaymentServiceClient {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	gs := grpc.NewServer(srv.ServerOptions()...)
	testpb.RegisterPaymentServiceServer(gs, grpcPayments{l: l})
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return testpb.NewPaymentServiceClient(conn)
}

func TestStreams(t *testing.T) {
	l := newLedger()
	hs := serveConnect(t, newServer(t, memstore.New()), l, nil)
	for _, p := range protocols {
		client := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL, p.opt)
		t.Run(p.name+"/server", func(t *testing.T) {
			key := "inst-" + p.name
			var got [2][]string
			var headers [2]http.Header
			for i := range 2 {
				req := connect.NewRequest(&testpb.InstallmentsRequest{Account: "a", AmountCents: 300, Count: 3})
				req.Header().Set("Idempotency-Key", key)
				st, err := client.ChargeInstallments(context.Background(), req)
				require.NoError(t, err)
				for st.Receive() {
					got[i] = append(got[i], st.Msg().ChargeId)
				}
				require.NoError(t, st.Err())
				headers[i] = st.ResponseHeader()
				assert.Equal(t, "yes", st.ResponseTrailer().Get("X-Settled"))
				require.NoError(t, st.Close())
			}
			assert.Len(t, got[0], 3)
			assert.Equal(t, got[0], got[1])
			assert.False(t, idemconnect.IsReplayed(headers[0]))
			assert.True(t, idemconnect.IsReplayed(headers[1]))
			assert.Equal(t, headers[0].Get("X-Charge-Id"), headers[1].Get("X-Charge-Id"))
			assert.Equal(t, 1, l.count(key))
		})
		t.Run(p.name+"/client", func(t *testing.T) {
			key := "batch-" + p.name
			send := func(amounts ...int64) (*connect.Response[testpb.BatchResponse], error) {
				st := client.ChargeBatch(context.Background())
				st.RequestHeader().Set("Idempotency-Key", key)
				for _, a := range amounts {
					require.NoError(t, st.Send(&testpb.ChargeRequest{Account: "a", AmountCents: a}))
				}
				return st.CloseAndReceive()
			}
			r1, err := send(1, 2, 3)
			require.NoError(t, err)
			r2, err := send(1, 2, 3)
			require.NoError(t, err)
			assert.Len(t, r1.Msg.Charges, 3)
			assert.Equal(t, r1.Msg.Charges[2].ChargeId, r2.Msg.Charges[2].ChargeId)
			assert.True(t, idemconnect.IsReplayed(r2.Header()))
			_, err = send(1, 2, 4)
			assert.Equal(t, connect.CodeFailedPrecondition, connect.CodeOf(err), "%v", err)
			assert.Equal(t, 1, l.count(key))
		})
		if p.name == "grpcweb" {
			continue // gRPC-Web has no bidirectional streams
		}
		t.Run(p.name+"/bidi", func(t *testing.T) {
			key := "inter-" + p.name
			var got [2][]string
			for i := range 2 {
				st := client.ChargeInteractive(context.Background())
				st.RequestHeader().Set("Idempotency-Key", key)
				for _, a := range []int64{10, 20} {
					require.NoError(t, st.Send(&testpb.ChargeRequest{Account: "a", AmountCents: a}))
					r, err := st.Receive()
					require.NoError(t, err)
					got[i] = append(got[i], r.ChargeId)
				}
				require.NoError(t, st.CloseRequest())
				_, err := st.Receive()
				require.ErrorIs(t, err, io.EOF)
				require.NoError(t, st.CloseResponse())
			}
			assert.Equal(t, got[0], got[1])
			assert.Equal(t, 1, l.count(key))
		})
	}
}

// TestDuplicateWaitsForTheFirst: a duplicate arriving while the first call
// runs waits for it and replays its outcome.
func TestDuplicateWaitsForTheFirst(t *testing.T) {
	l := newLedger()
	l.delay = 300 * time.Millisecond
	hs := serveConnect(t, newServer(t, memstore.New()), l, nil)
	client := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL)
	var wg sync.WaitGroup
	ids := make([]string, 4)
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := connect.NewRequest(&testpb.ChargeRequest{Account: "a", AmountCents: 100})
			req.Header().Set("Idempotency-Key", "concurrent")
			resp, err := client.Charge(context.Background(), req)
			if assert.NoError(t, err) {
				ids[i] = resp.Msg.ChargeId
			}
		}()
	}
	wg.Wait()
	assert.Equal(t, 1, l.count("concurrent"))
	for _, id := range ids {
		assert.Equal(t, ids[0], id)
	}
}

// TestClientRetriesWithTheSameKey: the first attempt's answer is lost after
// the handler ran (the proxy answers 503 instead); the client interceptor
// retries with the same key and gets the stored outcome.
func TestClientRetriesWithTheSameKey(t *testing.T) {
	l := newLedger()
	var (
		mu   sync.Mutex
		seen []string
	)
	dropFirst := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			seen = append(seen, r.Header.Get("Idempotency-Key"))
			n := len(seen)
			mu.Unlock()
			if n == 1 {
				next.ServeHTTP(httptest.NewRecorder(), r) // the charge is made, its answer lost
				http.Error(w, "upstream connection reset", http.StatusServiceUnavailable)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
	hs := serveConnect(t, newServer(t, memstore.New()), l, dropFirst)
	client := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL,
		connect.WithInterceptors(idemconnect.NewClientInterceptor(idempotency.WithMaxAttempts(3), idempotency.WithBackoff(time.Millisecond, 5*time.Millisecond))))
	resp, err := client.Charge(context.Background(), connect.NewRequest(&testpb.ChargeRequest{Account: "a", AmountCents: 100}))
	require.NoError(t, err)
	assert.True(t, idemconnect.IsReplayed(resp.Header()), "the retry is answered from the record")
	keys := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), seen...)
	}
	require.Len(t, keys(), 2)
	assert.NotEmpty(t, keys()[0])
	assert.Equal(t, keys()[0], keys()[1], "every attempt carries the same key")
	assert.Equal(t, 1, l.count(keys()[0]))

	// A key the caller chose is kept, and a bad one refused before sending.
	req := connect.NewRequest(&testpb.ChargeRequest{Account: "a", AmountCents: 7})
	req.Header().Set("Idempotency-Key", "mine")
	_, err = client.Charge(context.Background(), req)
	require.NoError(t, err)
	assert.Equal(t, "mine", keys()[len(keys())-1])
	n := len(keys())
	req = connect.NewRequest(&testpb.ChargeRequest{Account: "a", AmountCents: 7})
	req.Header().Set("Idempotency-Key", "not ok")
	_, err = client.Charge(context.Background(), req)
	assert.Equal(t, connect.CodeInvalidArgument, connect.CodeOf(err), "%v", err)
	assert.Len(t, keys(), n, "a bad key is refused before anything is sent")
}

// TestClientStreamsGetKeys: streams of the client interceptor carry a key,
// and a server stream whose attempt failed before its first message is
// retried with it.
func TestClientStreamsGetKeys(t *testing.T) {
	l := newLedger()
	var (
		mu   sync.Mutex
		seen []string
	)
	dropFirst := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			seen = append(seen, r.Header.Get("Idempotency-Key"))
			n := len(seen)
			mu.Unlock()
			if n == 1 {
				http.Error(w, "overloaded", http.StatusServiceUnavailable)
				return
			}
			next.ServeHTTP(w, r)
		})
	}
	hs := serveConnect(t, newServer(t, memstore.New()), l, dropFirst)
	client := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL, connect.WithGRPC(),
		connect.WithInterceptors(idemconnect.NewClientInterceptor(idempotency.WithMaxAttempts(3), idempotency.WithBackoff(time.Millisecond, 5*time.Millisecond))))
	st, err := client.ChargeInstallments(context.Background(), connect.NewRequest(&testpb.InstallmentsRequest{Account: "a", AmountCents: 30, Count: 3}))
	require.NoError(t, err)
	n := 0
	for st.Receive() {
		n++
	}
	require.NoError(t, st.Err())
	require.NoError(t, st.Close())
	assert.Equal(t, 3, n)
	mu.Lock()
	require.Len(t, seen, 2)
	assert.NotEmpty(t, seen[0])
	assert.Equal(t, seen[0], seen[1])
	mu.Unlock()

	bs := client.ChargeBatch(context.Background())
	require.NoError(t, bs.Send(&testpb.ChargeRequest{AmountCents: 1}))
	_, err = bs.CloseAndReceive()
	require.NoError(t, err)
	mu.Lock()
	assert.NotEmpty(t, seen[2], "a client stream gets a key")
	mu.Unlock()
}

// policyService implements PolicyService for the policy tests: it answers
// with the request's key field.
type policyService struct{ l *ledger }

func (p policyService) transfer(ctx context.Context, req *connect.Request[testpb.TransferRequest]) (*connect.Response[testpb.TransferResponse], error) {
	return connect.NewResponse(&testpb.TransferResponse{TransferId: p.l.run(ctx), RequestId: req.Msg.RequestId, AmountCents: req.Msg.AmountCents}), nil
}

func (p policyService) Transfer(ctx context.Context, r *connect.Request[testpb.TransferRequest]) (*connect.Response[testpb.TransferResponse], error) {
	return p.transfer(ctx, r)
}
func (p policyService) Refund(ctx context.Context, r *connect.Request[testpb.TransferRequest]) (*connect.Response[testpb.TransferResponse], error) {
	return p.transfer(ctx, r)
}
func (p policyService) Inspect(ctx context.Context, r *connect.Request[testpb.TransferRequest]) (*connect.Response[testpb.TransferResponse], error) {
	return p.transfer(ctx, r)
}
func (p policyService) SetLimit(ctx context.Context, r *connect.Request[testpb.TransferRequest]) (*connect.Response[testpb.TransferResponse], error) {
	return p.transfer(ctx, r)
}
func (p policyService) Replace(ctx context.Context, r *connect.Request[testpb.TransferRequest]) (*connect.Response[testpb.TransferResponse], error) {
	return p.transfer(ctx, r)
}
func (p policyService) Ping(ctx context.Context, r *connect.Request[testpb.TransferRequest]) (*connect.Response[testpb.TransferResponse], error) {
	return p.transfer(ctx, r)
}
func (p policyService) TransferSteps(ctx context.Context, r *connect.Request[testpb.TransferRequest], ss *connect.ServerStream[testpb.TransferResponse]) error {
	id := p.l.run(ctx)
	for i := int32(0); i < r.Msg.Count; i++ {
		if err := ss.Send(&testpb.TransferResponse{TransferId: fmt.Sprintf("%s/%d", id, i), RequestId: r.Msg.RequestId}); err != nil {
			return err
		}
	}
	return nil
}
func (p policyService) TransferBatch(ctx context.Context, cs *connect.ClientStream[testpb.TransferRequest]) (*connect.Response[testpb.TransferResponse], error) {
	id := p.l.run(ctx)
	for cs.Receive() {
	}
	return connect.NewResponse(&testpb.TransferResponse{TransferId: id}), cs.Err()
}
func (p policyService) Legacy(ctx context.Context, r *connect.Request[testpb.LegacyRequest]) (*connect.Response[testpb.TransferResponse], error) {
	return connect.NewResponse(&testpb.TransferResponse{TransferId: p.l.run(ctx)}), nil
}

// TestProtoPolicies: the proto's options decide for connect handlers and
// clients as they do for grpc-go.
func TestProtoPolicies(t *testing.T) {
	l := newLedger()
	hs := serveConnect(t, newServer(t, memstore.New()), l, nil)
	plain := testpbconnect.NewPolicyServiceClient(hs.Client(), hs.URL)

	// Transfer requires a key.
	_, err := plain.Transfer(context.Background(), connect.NewRequest(&testpb.TransferRequest{Account: "a", AmountCents: 5}))
	assert.Equal(t, connect.CodeInvalidArgument, connect.CodeOf(err))
	assert.ErrorContains(t, err, "requires an idempotency key")

	// request_id carries it.
	for range 2 {
		_, err = plain.Transfer(context.Background(), connect.NewRequest(&testpb.TransferRequest{RequestId: "r-1", Account: "a", AmountCents: 5}))
		require.NoError(t, err)
	}
	assert.Equal(t, 1, l.count("r-1"))

	// Header and field disagree.
	req := connect.NewRequest(&testpb.TransferRequest{RequestId: "r-2", AmountCents: 5})
	req.Header().Set("Idempotency-Key", "other")
	_, err = plain.Transfer(context.Background(), req)
	assert.Equal(t, connect.CodeInvalidArgument, connect.CodeOf(err))

	// NO_SIDE_EFFECTS takes no part, key or not.
	req = connect.NewRequest(&testpb.TransferRequest{RequestId: "r-3"})
	req.Header().Set("Idempotency-Key", "inspect")
	for range 2 {
		_, err = plain.Inspect(context.Background(), req)
		require.NoError(t, err)
	}
	assert.Equal(t, 2, l.count("<none>"))

	// The client interceptor fills request_id (AIP-4235) and keeps it.
	keyed := testpbconnect.NewPolicyServiceClient(hs.Client(), hs.URL, connect.WithInterceptors(idemconnect.NewClientInterceptor()))
	msg := &testpb.TransferRequest{Account: "a", AmountCents: 9}
	resp, err := keyed.Transfer(context.Background(), connect.NewRequest(msg))
	require.NoError(t, err)
	assert.Len(t, msg.RequestId, 36, "request_id filled with a UUID4")
	assert.Equal(t, msg.RequestId, resp.Msg.RequestId)
	assert.Equal(t, 1, l.count(msg.RequestId))
}

// TestStoreDownFailsClosed: a store that cannot serve refuses new calls with
// Unavailable (HTTP 503 over Connect), before the handler runs.
func TestStoreDownFailsClosed(t *testing.T) {
	store := memstore.New()
	l := newLedger()
	hs := serveConnect(t, newServer(t, store), l, nil)
	require.NoError(t, store.Close())
	req, err := http.NewRequest(http.MethodPost, hs.URL+"/idempotency.testing.v1.PaymentService/Charge", bytes.NewReader([]byte(`{"account":"a"}`)))
	require.NoError(t, err)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", "down")
	resp, err := hs.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	assert.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	assert.Equal(t, 0, l.count("down"))
}

func TestFromStatus(t *testing.T) {
	assert.NoError(t, idemconnect.FromStatus(nil))
	plain := errors.New("plain")
	assert.Same(t, plain, idemconnect.FromStatus(plain))
	ce := connect.NewError(connect.CodeAborted, plain)
	assert.Same(t, ce, idemconnect.FromStatus(ce))

	st, err := status.New(codes.FailedPrecondition, "card expired").WithDetails(&testpb.ChargeResponse{ChargeId: "ch_1"})
	require.NoError(t, err)
	var got *connect.Error
	require.ErrorAs(t, idemconnect.FromStatus(st.Err()), &got)
	assert.Equal(t, connect.CodeFailedPrecondition, got.Code())
	assert.Equal(t, "card expired", got.Message())
	require.Len(t, got.Details(), 1)
	v, err := got.Details()[0].Value()
	require.NoError(t, err)
	assert.Equal(t, "ch_1", v.(*testpb.ChargeResponse).ChargeId)
}
