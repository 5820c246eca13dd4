package idemotel_test

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/idemotel"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/memstore"
)

const chargeMethod = "idempotency.testing.v1.PaymentService/Charge"

// service charges; an account named "hold" blocks until release is closed.
type service struct {
	testpb.UnimplementedPaymentServiceServer
	execs   atomic.Int64
	held    chan struct{}
	release chan struct{}
}

func (s *service) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	s.execs.Add(1)
	if req.Account == "hold" {
		s.held <- struct{}{}
		<-s.release
	}
	return &testpb.ChargeResponse{ChargeId: "ch_1", Account: req.Account, AmountCents: req.AmountCents}, nil
}

// failingStore fails every Reserve, as an unreachable store does.
type failingStore struct{ idempotency.Store }

func (failingStore) Reserve(context.Context, string, idempotency.Claim) (idempotency.Entry, error) {
	return idempotency.Entry{}, errors.New("connection refused")
}

// serve serves svc behind a tracing interceptor (standing in for otelgrpc:
// it starts each call's span) and the idempotency interceptors.
func serve(t *testing.T, store idempotency.Store, svc *service, tp trace.TracerProvider, opts ...idempotency.Option) testpb.PaymentServiceClient {
	t.Helper()
	idem, err := idempotency.NewServer(store, append([]idempotency.Option{idempotency.WithLogger(nil)}, opts...)...)
	require.NoError(t, err)
	tracer := tp.Tracer("test")
	traced := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		ctx, span := tracer.Start(ctx, info.FullMethod, trace.WithSpanKind(trace.SpanKindServer))
		defer span.End()
		return handler(ctx, req)
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(traced, idem.UnaryServerInterceptor()))
	testpb.RegisterPaymentServiceServer(srv, svc)
	lis := bufconn.Listen(1 << 20)
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
	})
	return testpb.NewPaymentServiceClient(conn)
}

func withKey(ctx context.Context, key string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, key)
}

// metrics collects what reader holds, by instrument name.
func metrics(t *testing.T, reader *sdkmetric.ManualReader) map[string]metricdata.Metrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(context.Background(), &rm))
	out := make(map[string]metricdata.Metrics)
	for _, sm := range rm.ScopeMetrics {
		if sm.Scope.Name != idemotel.ScopeName {
			continue
		}
		for _, m := range sm.Metrics {
			out[m.Name] = m
		}
	}
	return out
}

// matches says whether set holds every attribute of want.
func matches(set attribute.Set, want []attribute.KeyValue) bool {
	for _, kv := range want {
		if v, ok := set.Value(kv.Key); !ok || v != kv.Value {
			return false
		}
	}
	return true
}

// count sums a counter's points whose attributes hold want.
func count(t *testing.T, ms map[string]metricdata.Metrics, name string, want ...attribute.KeyValue) int64 {
	t.Helper()
	m, ok := ms[name]
	if !ok {
		return 0 // nothing counted yet
	}
	sum, ok := m.Data.(metricdata.Sum[int64])
	require.True(t, ok, "%s is a %T, not an int64 sum", name, m.Data)
	var n int64
	for _, p := range sum.DataPoints {
		if matches(p.Attributes, want) {
			n += p.Value
		}
	}
	return n
}

// observations counts a histogram's observations whose attributes hold want,
// and sums them.
func observations[N int64 | float64](t *testing.T, ms map[string]metricdata.Metrics, name string, want ...attribute.KeyValue) (uint64, N) {
	t.Helper()
	m, ok := ms[name]
	require.True(t, ok, "no metric %s", name)
	h, ok := m.Data.(metricdata.Histogram[N])
	require.True(t, ok, "%s is a %T", name, m.Data)
	var n uint64
	var sum N
	for _, p := range h.DataPoints {
		if matches(p.Attributes, want) {
			n += p.Count
			sum += p.Sum
		}
	}
	return n, sum
}

var (
	method  = attribute.String("rpc.method", chargeMethod)
	codeOK  = attribute.String("rpc.response.status_code", "OK")
	aborted = attribute.String("rpc.response.status_code", "ABORTED")
)

// Calls through a real gRPC server on a bbolt store, with every outcome the
// counters count, and the group commits of the store.
func TestMetricsAndSpans(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	tel := idemotel.New(idemotel.WithMeterProvider(mp), idemotel.WithTracerProvider(tp))

	store, err := boltstore.Open(filepath.Join(t.TempDir(), "idem.db"), boltstore.WithCommitObserver(tel.BoltCommits))
	require.NoError(t, err)
	t.Cleanup(func() { store.Close() })
	svc := &service{held: make(chan struct{}), release: make(chan struct{})}
	client := serve(t, store, svc, tp, tel.ServerOption(),
		idempotency.WithMaxRecordSize(1024), idempotency.WithWaitTimeout(500*time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req := &testpb.ChargeRequest{Account: "acct", AmountCents: 100}

	// Two first executions, a replay, a key reused.
	_, err = client.Charge(withKey(ctx, "a"), req)
	require.NoError(t, err)
	_, err = client.Charge(withKey(ctx, "b"), req)
	require.NoError(t, err)
	_, err = client.Charge(withKey(ctx, "a"), req)
	require.NoError(t, err)
	_, err = client.Charge(withKey(ctx, "a"), &testpb.ChargeRequest{Account: "other", AmountCents: 100})
	require.Equal(t, codes.FailedPrecondition, status.Code(err))

	// A duplicate waits for the running first execution, then is
	// replayed; another gives up waiting (the wait bound ends).
	hold := &testpb.ChargeRequest{Account: "hold", AmountCents: 100}
	var wg sync.WaitGroup
	wg.Go(func() {
		_, err := client.Charge(withKey(ctx, "held"), hold)
		assert.NoError(t, err)
	})
	<-svc.held
	_, err = client.Charge(withKey(ctx, "held"), hold)
	require.Equal(t, codes.Aborted, status.Code(err), "%v", err)
	wg.Go(func() {
		_, err := client.Charge(withKey(ctx, "held"), hold)
		assert.NoError(t, err)
	})
	time.Sleep(200 * time.Millisecond) // the duplicate waits
	close(svc.release)
	wg.Wait()

	// An outcome too large to store: only its status is stored.
	_, err = client.Charge(withKey(ctx, "big"), &testpb.ChargeRequest{Account: strings.Repeat("x", 2048), AmountCents: 100})
	require.NoError(t, err)
	require.EqualValues(t, 4, svc.execs.Load())

	ms := metrics(t, reader)
	stored := attribute.Bool("idempotency.stored", true)
	assert.EqualValues(t, 4, count(t, ms, "idempotency.server.executions", method, codeOK, stored))
	assert.EqualValues(t, 1, count(t, ms, "idempotency.server.replays", method, codeOK, attribute.Bool("idempotency.waited", false)))
	assert.EqualValues(t, 1, count(t, ms, "idempotency.server.replays", method, codeOK, attribute.Bool("idempotency.waited", true)))
	assert.EqualValues(t, 1, count(t, ms, "idempotency.server.mismatches", method, attribute.String("rpc.response.status_code", "FAILED_PRECONDITION")))
	assert.EqualValues(t, 1, count(t, ms, "idempotency.server.conflicts", method, aborted, attribute.Bool("idempotency.waited", true)))
	assert.EqualValues(t, 1, count(t, ms, "idempotency.server.oversized_records", method))
	assert.EqualValues(t, 0, count(t, ms, "idempotency.server.store_errors"))

	n, waited := observations[float64](t, ms, "idempotency.server.wait.duration", method)
	assert.EqualValues(t, 2, n, "the replay that waited and the duplicate that gave up")
	assert.Greater(t, waited, 0.65, "they waited at least 200ms and 500ms")
	n, _ = observations[float64](t, ms, "idempotency.server.handler.duration", method, codeOK)
	assert.EqualValues(t, 4, n)
	n, size := observations[int64](t, ms, "idempotency.server.record.size", method)
	assert.EqualValues(t, 4, n)
	assert.Positive(t, size)
	commits, records := observations[int64](t, ms, "idempotency.bolt.commit.records")
	st := store.Stats()
	assert.Equal(t, st.Commits, commits)
	assert.EqualValues(t, st.Records, records)
	n, _ = observations[float64](t, ms, "idempotency.bolt.commit.duration")
	assert.Equal(t, st.Commits, n)

	// The call spans carry their outcomes; the key is left out.
	outcomes := map[string]int{}
	var waitSpans int
	for _, s := range spans.Ended() {
		if s.Name() == "idempotency.wait" {
			waitSpans++
			assert.True(t, s.Parent().IsValid(), "the wait span is a child of the call's")
			continue
		}
		attrs := attribute.NewSet(s.Attributes()...)
		if v, ok := attrs.Value("idempotency.outcome"); ok {
			outcomes[v.AsString()]++
		}
		_, hasKey := attrs.Value("idempotency.key")
		assert.False(t, hasKey, "a key went on a span without WithKeys")
		if v, _ := attrs.Value("idempotency.waited"); v.AsBool() {
			d, ok := attrs.Value("idempotency.wait.duration")
			assert.True(t, ok)
			assert.Greater(t, d.AsFloat64(), 0.15)
		}
	}
	assert.Equal(t, map[string]int{"executed": 4, "replayed": 2, "mismatch": 1, "conflict": 1}, outcomes)
	assert.Equal(t, 2, waitSpans)
}

// Store failures are counted, fail-closed and fail-open apart, and keys go
// on spans only with WithKeys.
func TestStoreFailuresAndKeys(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	spans := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans))
	opts := []idemotel.Option{idemotel.WithMeterProvider(mp), idemotel.WithTracerProvider(tp), idemotel.WithKeys()}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req := &testpb.ChargeRequest{Account: "acct", AmountCents: 100}

	down := failingStore{memstore.New()}
	closed := serve(t, down, &service{}, tp, idemotel.WithTelemetry(opts...))
	_, err := closed.Charge(withKey(ctx, "k"), req)
	require.Equal(t, codes.Unavailable, status.Code(err))
	open := serve(t, down, &service{}, tp, idemotel.WithTelemetry(opts...), idempotency.WithFailOpen())
	_, err = open.Charge(withKey(ctx, "k"), req)
	require.NoError(t, err)
	up := serve(t, memstore.New(), &service{}, tp, idemotel.WithTelemetry(opts...))
	_, err = up.Charge(withKey(ctx, "k"), req)
	require.NoError(t, err)

	ms := metrics(t, reader)
	assert.EqualValues(t, 1, count(t, ms, "idempotency.server.store_errors", method, attribute.String("rpc.response.status_code", "UNAVAILABLE")))
	assert.EqualValues(t, 1, count(t, ms, "idempotency.server.fail_opens", method))

	var events []string
	var keys int
	for _, s := range spans.Ended() {
		for _, e := range s.Events() {
			events = append(events, e.Name)
		}
		attrs := attribute.NewSet(s.Attributes()...)
		if v, ok := attrs.Value("idempotency.key"); ok {
			assert.Equal(t, "k", v.AsString())
			keys++
		}
	}
	assert.ElementsMatch(t, []string{"idempotency.store_error", "idempotency.fail_open"}, events)
	assert.Equal(t, 3, keys, "WithKeys puts the key on every call's span")
}

// BenchmarkObserve measures what Telemetry adds to a call: one replay event,
// with metrics on an SDK MeterProvider and a recording span.
//
//	go test -run '^$' -bench Observe -benchmem ./idemotel
func BenchmarkObserve(b *testing.B) {
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(tracetest.NewSpanRecorder()))
	tel := idemotel.New(idemotel.WithMeterProvider(mp), idemotel.WithTracerProvider(tp))
	ctx, span := tp.Tracer("bench").Start(context.Background(), "call")
	defer span.End()
	e := idempotency.Event{Kind: idempotency.EventReplayed, Method: "/" + chargeMethod, Code: codes.OK, Duration: time.Millisecond}
	b.ReportAllocs()
	for b.Loop() {
		tel.Observe(ctx, e)
	}
}
