package redisstore_test

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// These tests put a tcpProxy between a replica and Redis and break the
// connection at the worst moments: as the handler returns, for less and for
// more than the store timeout, and by slowing every reply past the caller's
// deadline.

// faultService's Charge counts its executions (in every replica that shares
// execs) and calls beforeReturn, if set, as it returns.
type faultService struct {
	testpb.UnimplementedPaymentServiceServer
	name         string
	execs        *atomic.Int64
	beforeReturn func()
}

func (f *faultService) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	f.execs.Add(1)
	resp := &testpb.ChargeResponse{ChargeId: f.name + "-" + randomHex(8), Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}
	if f.beforeReturn != nil {
		f.beforeReturn()
	}
	return resp, nil
}

// countingStore counts the Completes an interceptor makes, and those that
// failed.
type countingStore struct {
	idempotency.Store
	completes, failed atomic.Int64
}

func (s *countingStore) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	s.completes.Add(1)
	err := s.Store.Complete(ctx, key, token, record, retention)
	if err != nil {
		s.failed.Add(1)
	}
	return err
}

// eventLog keeps what an interceptor observed.
type eventLog struct {
	mu     sync.Mutex
	events []idempotency.Event
}

func (l *eventLog) observe(_ context.Context, e idempotency.Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

func (l *eventLog) of(kind idempotency.EventKind) []idempotency.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []idempotency.Event
	for _, e := range l.events {
		if e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}

// serveReplica serves svc on loopback with the interceptor on store, until
// cleanup, and returns a client of it.
func serveReplica(t *testing.T, store idempotency.Store, svc testpb.PaymentServiceServer, opts ...idempotency.Option) testpb.PaymentServiceClient {
	t.Helper()
	opts = append([]idempotency.Option{idempotency.WithLogger(nil)}, opts...)
	srv := grpc.NewServer(grpc.UnaryInterceptor(mustServer(store, opts...).UnaryServerInterceptor()))
	testpb.RegisterPaymentServiceServer(srv, svc)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = conn.Close()
		srv.Stop()
		<-served
	})
	return testpb.NewPaymentServiceClient(conn)
}

// proxiedClient returns a client of the test Redis through p. go-redis
// retries neither commands (MaxRetries -1) nor dials (DialerRetries 1):
// its dial retries alone, 100ms apart, can ride out a short outage, and
// what a test must see ride it out is the interceptor's retry.
func proxiedClient(t *testing.T, p *tcpProxy, opts ...func(*redis.Options)) *redis.Client {
	t.Helper()
	return newClient(t, append([]func(*redis.Options){func(o *redis.Options) {
		o.Addr = p.addr()
		o.MaxRetries = -1
		o.DialerRetries = 1
	}}, opts...)...)
}

func once(f func()) func() {
	var o sync.Once
	return func() { o.Do(f) }
}

// Redis becomes unreachable right as the handler returns: every connection
// is cut and new ones are refused for 300ms. The interceptor must retry
// Complete until the record is stored, and a duplicate must replay it, the
// handler having run once.
func TestCompleteRetriedAcrossConnectionCut(t *testing.T) {
	forEachMode(t, testCompleteRetriedAcrossConnectionCut)
}

func testCompleteRetriedAcrossConnectionCut(t *testing.T, m storeMode) {
	admin := newClient(t)
	prefix := testPrefix(t, admin)
	px := startProxy(t, redisAddr(), 0)
	st := &countingStore{Store: m.store(t, proxiedClient(t, px), prefix)}
	var execs atomic.Int64
	var events eventLog
	svc := &faultService{name: "A", execs: &execs, beforeReturn: once(func() { px.cut(300 * time.Millisecond) })}
	client := serveReplica(t, st, svc, idempotency.WithObserver(events.observe))

	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()
	first := chargeVia(ctx, client, "k", "acct")
	require.NoError(t, first.err)
	assert.False(t, first.replayed)
	assert.GreaterOrEqual(t, st.failed.Load(), int64(1), "the cut did not fail a Complete; the test proves nothing")
	assert.Equal(t, st.failed.Load()+1, st.completes.Load(), "Complete was not retried until it succeeded")
	executed := events.of(idempotency.EventExecuted)
	require.Len(t, executed, 1)
	assert.True(t, executed[0].Stored, "the outcome was not stored")

	dctx, dcancel := context.WithTimeout(ctx, 3*time.Second)
	defer dcancel()
	dup := chargeVia(dctx, client, "k", "acct")
	require.NoError(t, dup.err, "the duplicate was not answered from the record")
	assert.True(t, dup.replayed)
	assert.True(t, proto.Equal(first.resp, dup.resp))
	assert.Equal(t, int64(1), execs.Load())
}

// Redis stays unreachable from replica A for longer than its store timeout
// after the handler returned. A's caller still gets the handler's real
// outcome, once Complete has been retried within the store timeout. The key is
// not released: until its lease runs out a duplicate waits and gets
// Aborted, on a replica that reaches Redis, or fails with Unavailable on A,
// and never runs the handler again. After the lease the call can run again:
// that is what such a fault costs.
func TestOutcomeReturnedWhenStoreStaysDown(t *testing.T) {
	forEachMode(t, testOutcomeReturnedWhenStoreStaysDown)
}

func testOutcomeReturnedWhenStoreStaysDown(t *testing.T, m storeMode) {
	admin := newClient(t)
	prefix := testPrefix(t, admin)
	px := startProxy(t, redisAddr(), 0)
	const lease, storeTimeout, waitTimeout = 3 * time.Second, 500 * time.Millisecond, 300 * time.Millisecond
	stA := &countingStore{Store: m.store(t, proxiedClient(t, px), prefix)}
	var execs atomic.Int64
	var events eventLog
	var returned time.Time
	svcA := &faultService{name: "A", execs: &execs, beforeReturn: once(func() {
		px.cut(2 * time.Second)
		returned = time.Now()
	})}
	a := serveReplica(t, stA, svcA, idempotency.WithObserver(events.observe),
		idempotency.WithLease(lease), idempotency.WithStoreTimeout(storeTimeout), idempotency.WithWaitTimeout(waitTimeout))
	b := serveReplica(t, m.store(t, newClient(t), prefix), &faultService{name: "B", execs: &execs},
		idempotency.WithLease(lease), idempotency.WithWaitTimeout(waitTimeout))
	watch := m.store(t, admin, prefix)

	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()
	first := chargeVia(ctx, a, "k", "acct")
	answered := time.Now()
	require.NoError(t, first.err, "the caller must get the handler's outcome, not the store's failure")
	assert.False(t, first.replayed)
	assert.Contains(t, first.resp.GetChargeId(), "A-")
	assert.Greater(t, stA.completes.Load(), int64(1), "Complete was not retried")
	assert.Equal(t, stA.completes.Load(), stA.failed.Load(), "a Complete went through the cut")
	assert.Less(t, answered.Sub(returned), storeTimeout+2*time.Second, "retrying Complete held the caller past the store timeout")
	executed := events.of(idempotency.EventExecuted)
	require.Len(t, executed, 1)
	assert.False(t, executed[0].Stored)

	e, err := watch.Lookup(ctx, idempotency.StoreKey("", "k"))
	require.NoError(t, err)
	require.Equal(t, idempotency.Pending, e.State, "the key was released after Complete failed")
	held := e.Token

	dupB := chargeVia(ctx, b, "k", "acct")
	assert.Equal(t, codes.Aborted, status.Code(dupB.err), "duplicate on B: %v", dupB.err)
	dupA := chargeVia(ctx, a, "k", "acct")
	assert.Contains(t, []codes.Code{codes.Unavailable, codes.Aborted}, status.Code(dupA.err), "duplicate on A: %v", dupA.err)
	assert.Equal(t, int64(1), execs.Load(), "a duplicate ran the handler again while the lease held")
	e, err = watch.Lookup(ctx, idempotency.StoreKey("", "k"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Pending, e.State)
	assert.Equal(t, held, e.Token)

	// The lease runs out (no handler renews it), and a retry runs again.
	require.True(t, await(eventually, func() bool {
		e, err := watch.Lookup(ctx, idempotency.StoreKey("", "k"))
		return err == nil && e.State == idempotency.Absent
	}), "the lease never ran out")
	retry := chargeVia(ctx, b, "k", "acct")
	require.NoError(t, retry.err)
	assert.False(t, retry.replayed)
	assert.Equal(t, int64(2), execs.Load())
}

// Every reply from Redis comes 150ms late, and the caller's deadline is
// 100ms: it gives up while Reserve is under way, after Redis has made the
// key pending under its token. The key must not stay held for the lease
// (10s by default): a retry with the same key right after, with a normal
// deadline, runs promptly, and is the one execution (the handler does not
// run for the caller that gave up). With go-redis bounding its reads by the
// context (ContextTimeoutEnabled), a Reserve on the caller's context was cut
// off with the key taken; without, it returned late and ran the handler.
func TestCallerDeadlineDuringReserve(t *testing.T) { forEachMode(t, testCallerDeadlineDuringReserve) }

func testCallerDeadlineDuringReserve(t *testing.T, m storeMode) {
	for _, ctxTimeouts := range []bool{true, false} {
		name := "io-timeouts"
		if ctxTimeouts {
			name = "context-timeouts"
		}
		t.Run(name, func(t *testing.T) {
			admin := newClient(t)
			prefix := testPrefix(t, admin)
			px := startProxy(t, redisAddr(), 150*time.Millisecond)
			st := m.store(t, proxiedClient(t, px, func(o *redis.Options) { o.ContextTimeoutEnabled = ctxTimeouts }), prefix)
			var execs atomic.Int64
			client := serveReplica(t, st, &faultService{name: "A", execs: &execs})
			// Open a connection and load the scripts first, so that the
			// call's Reserve reaches Redis at once and only its answer is
			// late, as on a replica that has been serving for a while.
			bg := context.Background()
			_, err := st.Reserve(bg, "warm-up", claim("w"))
			require.NoError(t, err)
			require.NoError(t, st.Release(bg, "warm-up", "w"))

			ctx, cancel := context.WithTimeout(bg, 100*time.Millisecond)
			first := chargeVia(ctx, client, "k", "acct")
			cancel()
			require.Error(t, first.err, "the first call outlived its deadline")

			start := time.Now()
			ctx, cancel = context.WithTimeout(bg, 4*time.Second)
			defer cancel()
			retry := chargeVia(ctx, client, "k", "acct")
			require.NoError(t, retry.err, "the retry waited for the lease of a caller that gave up")
			t.Logf("retry answered in %v", time.Since(start).Round(time.Millisecond))
			// The key was released, not run for nobody: the retry is the
			// first execution.
			assert.False(t, retry.replayed, "the handler ran for the caller that had given up")
			assert.Equal(t, int64(1), execs.Load())
			e, err := m.store(t, admin, prefix).Lookup(ctx, idempotency.StoreKey("", "k"))
			require.NoError(t, err)
			assert.Equal(t, idempotency.Completed, e.State)
		})
	}
}
