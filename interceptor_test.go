package idempotency_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
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

	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/memstore"
)

var chargeReq = &testpb.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}

type answer struct {
	resp            *testpb.ChargeResponse
	err             error
	header, trailer metadata.MD
}

func charge(ctx context.Context, e *env, req *testpb.ChargeRequest, opts ...grpc.CallOption) answer {
	var a answer
	opts = append(opts, grpc.Header(&a.header), grpc.Trailer(&a.trailer))
	a.resp, a.err = e.client.Charge(ctx, req, opts...)
	return a
}

func TestUnaryReplayIsByteIdentical(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		ctx := withKey(testCtx(t), "order-42")

		first := charge(ctx, e, chargeReq)
		require.NoError(t, first.err)
		assert.False(t, idempotency.IsReplayed(first.header), "the first execution must not carry the replay header")
		assert.Empty(t, first.header.Get(idempotency.ReplayedHeader))

		for range 3 {
			again := charge(ctx, e, chargeReq)
			require.NoError(t, again.err)
			assert.True(t, idempotency.IsReplayed(again.header))
			assert.Equal(t, mustMarshal(t, first.resp), mustMarshal(t, again.resp))
			assert.Equal(t, stripped(first.header), stripped(again.header))
			assert.Equal(t, first.trailer, again.trailer)
			assert.Equal(t, []string{string([]byte{0, 1, 0xfe, 0xff})}, again.header.Get("x-sig-bin"))
		}
		assert.EqualValues(t, 1, e.svc.execs.Load())
	})
}

func TestUnaryErrorWithDetailsIsReplayed(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		ctx := withKey(testCtx(t), "bad-1")
		bad := &testpb.ChargeRequest{Account: "", AmountCents: 5}

		first := charge(ctx, e, bad)
		require.Equal(t, codes.InvalidArgument, status.Code(first.err))
		require.NotEmpty(t, status.Convert(first.err).Details(), "the test server sends details")
		again := charge(ctx, e, bad)
		assert.Equal(t, statusBytes(t, first.err), statusBytes(t, again.err), "code, message and details replay byte for byte")
		assert.Equal(t, stripped(first.header), stripped(again.header))
		assert.Equal(t, first.trailer, again.trailer)
		assert.True(t, idempotency.IsReplayed(again.header))
		assert.EqualValues(t, 1, e.svc.execs.Load(), "a cacheable error is replayed, not run again")
	})
}

// A status message that is not valid UTF-8 cannot go into a protobuf string,
// yet a duplicate gets the error replayed as the first caller got it (grpc-go
// sends each invalid byte as U+FFFD), not run again and not an Internal error.
func TestUnaryErrorMessageNotUTF8IsReplayed(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		ctx := withKey(testCtx(t), "latin1-1")
		req := &testpb.ChargeRequest{Account: "latin1", AmountCents: 5}
		first := charge(ctx, e, req)
		require.Equal(t, codes.InvalidArgument, status.Code(first.err))
		again := charge(ctx, e, req)
		require.Equal(t, codes.InvalidArgument, status.Code(again.err), "the duplicate gets the first execution's code: %v", again.err)
		require.Equal(t, "no such account: caf\uFFFD", status.Convert(first.err).Message(), "what grpc-go sends")
		assert.Equal(t, statusBytes(t, first.err), statusBytes(t, again.err))
		assert.True(t, idempotency.IsReplayed(again.header))
		assert.EqualValues(t, 1, e.svc.execs.Load(), "the error is replayed, not run again")

		// The same through the stream interceptor.
		ctx = withKey(testCtx(t), "latin1-2")
		sreq := &testpb.InstallmentsRequest{Account: "latin1", AmountCents: 5, Count: 1}
		sfirst := installments(t, ctx, e, sreq)
		require.Equal(t, codes.InvalidArgument, status.Code(sfirst.err))
		sagain := installments(t, ctx, e, sreq)
		require.Equal(t, codes.InvalidArgument, status.Code(sagain.err), "the duplicate gets the first execution's code: %v", sagain.err)
		assert.Equal(t, statusBytes(t, sfirst.err), statusBytes(t, sagain.err))
		assert.EqualValues(t, 2, e.svc.execs.Load(), "the stream's error is replayed, not run again")
	})
}

func TestUnaryTransientErrorRunsAgain(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		ctx := withKey(testCtx(t), "flaky-1")
		flaky := &testpb.ChargeRequest{Account: "flaky", AmountCents: 5}
		for i := range 3 {
			a := charge(ctx, e, flaky)
			assert.Equal(t, codes.Internal, status.Code(a.err))
			assert.False(t, idempotency.IsReplayed(a.header))
			assert.EqualValues(t, i+1, e.svc.execs.Load(), "Internal is not cached: every retry runs")
		}
		e.svc.failFirst.Store(1)
		ctx = withKey(testCtx(t), "unavailable-1")
		a := charge(ctx, e, chargeReq)
		require.Equal(t, codes.Unavailable, status.Code(a.err))
		b := charge(ctx, e, chargeReq)
		require.NoError(t, b.err, "the retry after Unavailable runs and succeeds")
		assert.False(t, idempotency.IsReplayed(b.header))
		c := charge(ctx, e, chargeReq)
		require.NoError(t, c.err)
		assert.Equal(t, b.resp.ChargeId, c.resp.ChargeId)
		assert.EqualValues(t, 5, e.svc.execs.Load())
	})
}

func TestCacheableCodesAreConfigurable(t *testing.T) {
	e := newEnv(t, memstore.New(), envConfig{server: []idempotency.Option{idempotency.WithCacheableCodes(codes.OK, codes.Internal)}})
	ctx := withKey(testCtx(t), "k")
	flaky := &testpb.ChargeRequest{Account: "flaky", AmountCents: 5}
	charge(ctx, e, flaky)
	a := charge(ctx, e, flaky)
	assert.Equal(t, codes.Internal, status.Code(a.err))
	assert.True(t, idempotency.IsReplayed(a.header))
	assert.EqualValues(t, 1, e.svc.execs.Load())
}

func TestConcurrentDuplicatesWaitAndReplay(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		e.svc.hold = make(chan struct{})
		e.svc.started = make(chan struct{}, 1)
		ctx := withKey(testCtx(t), "same-key")
		const n = 1000
		answers := make([]answer, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { answers[i] = charge(ctx, e, chargeReq) })
		}
		<-e.svc.started
		time.Sleep(100 * time.Millisecond) // let the duplicates queue up behind the first
		close(e.svc.hold)
		wg.Wait()

		require.EqualValues(t, 1, e.svc.execs.Load(), "exactly one execution")
		replays := 0
		for _, a := range answers {
			require.NoError(t, a.err)
			assert.Equal(t, answers[0].resp.ChargeId, a.resp.ChargeId)
			if idempotency.IsReplayed(a.header) {
				replays++
			}
		}
		assert.Equal(t, n-1, replays, "every answer but the first is a replay")
	})
}

func TestConcurrentDuplicatesRejected(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{server: []idempotency.Option{idempotency.WithRejectConcurrent()}})
		e.svc.hold = make(chan struct{})
		e.svc.started = make(chan struct{}, 1)
		ctx := withKey(testCtx(t), "same-key")

		firstDone := make(chan answer, 1)
		go func() { firstDone <- charge(ctx, e, chargeReq) }()
		<-e.svc.started
		const n = 999
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { errs[i] = charge(ctx, e, chargeReq).err })
		}
		wg.Wait()
		close(e.svc.hold)
		first := <-firstDone
		require.NoError(t, first.err)
		for _, err := range errs {
			require.Equal(t, codes.Aborted, status.Code(err), "%v", err)
		}
		assert.EqualValues(t, 1, e.svc.execs.Load())
	})
}

func TestWaitBoundGivesAborted(t *testing.T) {
	e := newEnv(t, memstore.New(), envConfig{server: []idempotency.Option{idempotency.WithWaitTimeout(50 * time.Millisecond)}})
	e.svc.hold = make(chan struct{})
	e.svc.started = make(chan struct{}, 1)
	ctx := withKey(testCtx(t), "slow")
	done := make(chan answer, 1)
	go func() { done <- charge(ctx, e, chargeReq) }()
	<-e.svc.started
	a := charge(ctx, e, chargeReq)
	assert.Equal(t, codes.Aborted, status.Code(a.err))
	assert.Contains(t, status.Convert(a.err).Message(), "still in progress")

	// The caller's own deadline bounds the wait too.
	dctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	b := charge(dctx, e, chargeReq)
	assert.Contains(t, []codes.Code{codes.Aborted, codes.DeadlineExceeded}, status.Code(b.err))
	close(e.svc.hold)
	require.NoError(t, (<-done).err)
	assert.EqualValues(t, 1, e.svc.execs.Load())
}

func TestKeyReusedForAnotherRequest(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		ctx := withKey(testCtx(t), "reused")
		require.NoError(t, charge(ctx, e, chargeReq).err)

		other := &testpb.ChargeRequest{Account: "acct_1", AmountCents: 9999, Currency: "EUR"}
		a := charge(ctx, e, other)
		assert.Equal(t, codes.FailedPrecondition, status.Code(a.err))
		assert.Contains(t, status.Convert(a.err).Message(), "different request")

		stream, err := e.client.ChargeInstallments(ctx, &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR", Count: 2})
		require.NoError(t, err)
		_, err = stream.Recv()
		assert.Equal(t, codes.FailedPrecondition, status.Code(err))
		assert.Contains(t, status.Convert(err).Message(), "/idempotency.testing.v1.PaymentService/Charge")
		assert.EqualValues(t, 1, e.svc.execs.Load(), "the handler does not run for a reused key")
	})
}

func TestKeyReusedWhileFirstRuns(t *testing.T) {
	e := newEnv(t, memstore.New(), envConfig{})
	e.svc.hold = make(chan struct{})
	e.svc.started = make(chan struct{}, 1)
	ctx := withKey(testCtx(t), "busy")
	done := make(chan answer, 1)
	go func() { done <- charge(ctx, e, chargeReq) }()
	<-e.svc.started
	a := charge(ctx, e, &testpb.ChargeRequest{Account: "other", AmountCents: 1})
	assert.Equal(t, codes.FailedPrecondition, status.Code(a.err), "a different request is refused at once, not after the wait")
	close(e.svc.hold)
	require.NoError(t, (<-done).err)
}

func TestKeyValidation(t *testing.T) {
	e := newEnv(t, memstore.New(), envConfig{})
	cases := []struct {
		name string
		md   metadata.MD
		want string
	}{
		{"empty", metadata.Pairs(idempotency.KeyHeader, ""), "empty"},
		{"256 characters", metadata.Pairs(idempotency.KeyHeader, strings.Repeat("k", 256)), "256 bytes"},
		{"non-ASCII", metadata.Pairs(idempotency.KeyHeader, "clé"), "0xc3"},
		{"space", metadata.Pairs(idempotency.KeyHeader, "a b"), "0x20"},
		{"control character", metadata.Pairs(idempotency.KeyHeader, "a\tb"), "0x09"},
		{"two values", metadata.Pairs(idempotency.KeyHeader, "a", idempotency.KeyHeader, "b"), "2 values"},
	}
	unary := mustServer(memstore.New()).UnaryServerInterceptor()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := metadata.NewOutgoingContext(testCtx(t), tc.md)
			a := charge(ctx, e, chargeReq)
			if tc.want == "0xc3" || tc.want == "0x09" {
				// grpc-go refuses to send such a header; other clients can,
				// so the interceptor is checked with it directly too.
				require.Error(t, a.err)
				a.err = nil
			} else {
				require.Equal(t, codes.InvalidArgument, status.Code(a.err), "%v", a.err)
				assert.Contains(t, status.Convert(a.err).Message(), idempotency.KeyHeader)
				assert.Contains(t, status.Convert(a.err).Message(), tc.want)
			}
			ran := false
			_, err := unary(metadata.NewIncomingContext(testCtx(t), tc.md), chargeReq,
				&grpc.UnaryServerInfo{FullMethod: testpb.PaymentService_Charge_FullMethodName},
				func(context.Context, any) (any, error) { ran = true; return &testpb.ChargeResponse{}, nil })
			require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
			assert.Contains(t, status.Convert(err).Message(), idempotency.KeyHeader)
			assert.Contains(t, status.Convert(err).Message(), tc.want)
			assert.False(t, ran)
		})
	}
	assert.EqualValues(t, 0, e.svc.execs.Load(), "a bad key never runs the handler")

	ok := charge(withKey(testCtx(t), strings.Repeat("k", 255)), e, chargeReq)
	require.NoError(t, ok.err, "255 visible characters are a valid key")
}

func TestNoKeyAndRequiredKey(t *testing.T) {
	e := newEnv(t, memstore.New(), envConfig{})
	for range 2 {
		require.NoError(t, charge(testCtx(t), e, chargeReq).err)
	}
	assert.EqualValues(t, 2, e.svc.execs.Load(), "without a key, calls run as without the interceptor")

	r := newEnv(t, memstore.New(), envConfig{server: []idempotency.Option{
		idempotency.WithRequiredKey(testpb.PaymentService_Charge_FullMethodName)}})
	a := charge(testCtx(t), r, chargeReq)
	require.Equal(t, codes.InvalidArgument, status.Code(a.err))
	assert.Contains(t, status.Convert(a.err).Message(), idempotency.KeyHeader)
	assert.EqualValues(t, 0, r.svc.execs.Load())

	s := newEnv(t, memstore.New(), envConfig{server: []idempotency.Option{
		idempotency.WithMethods("/other.Service/Method")}})
	ctx := withKey(testCtx(t), "k")
	charge(ctx, s, chargeReq)
	b := charge(ctx, s, chargeReq)
	assert.False(t, idempotency.IsReplayed(b.header))
	assert.EqualValues(t, 2, s.svc.execs.Load(), "a method outside WithMethods is not deduplicated")
}

func TestScopesAreIsolated(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		scope := idempotency.WithScope(func(ctx context.Context) (string, error) {
			v := metadata.ValueFromIncomingContext(ctx, "x-tenant")
			if len(v) != 1 {
				return "", status.Error(codes.Unauthenticated, "no tenant")
			}
			return v[0], nil
		})
		e := newEnv(t, newStore(t), envConfig{server: []idempotency.Option{scope}})
		base := withKey(testCtx(t), "shared-key")
		a := charge(metadata.AppendToOutgoingContext(base, "x-tenant", "tenant-a"), e, chargeReq)
		b := charge(metadata.AppendToOutgoingContext(base, "x-tenant", "tenant-b"), e, chargeReq)
		// A tenant name that would collide if scope and key were joined naively.
		c := charge(metadata.AppendToOutgoingContext(withKey(testCtx(t), "key"), "x-tenant", "tenant-a/shared-"), e, chargeReq)
		require.NoError(t, a.err)
		require.NoError(t, b.err)
		require.NoError(t, c.err)
		assert.False(t, idempotency.IsReplayed(b.header), "tenant B never gets tenant A's outcome")
		assert.NotEqual(t, a.resp.ChargeId, b.resp.ChargeId)
		assert.False(t, idempotency.IsReplayed(c.header))
		a2 := charge(metadata.AppendToOutgoingContext(base, "x-tenant", "tenant-a"), e, chargeReq)
		assert.Equal(t, a.resp.ChargeId, a2.resp.ChargeId)
		assert.EqualValues(t, 3, e.svc.execs.Load())

		d := charge(base, e, chargeReq)
		assert.Equal(t, codes.Unauthenticated, status.Code(d.err), "a scope error is returned as it is")
	})
}

func TestBoltReplaySurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "idem.db")
	s1, err := boltstore.Open(path)
	require.NoError(t, err)
	e1 := newEnv(t, s1, envConfig{})
	ctx := withKey(testCtx(t), "durable")
	first := charge(ctx, e1, chargeReq)
	require.NoError(t, first.err)
	require.NoError(t, s1.Close())

	s2 := openBolt(t, path)
	e2 := newEnv(t, s2, envConfig{})
	again := charge(ctx, e2, chargeReq)
	require.NoError(t, again.err)
	assert.True(t, idempotency.IsReplayed(again.header))
	assert.Equal(t, first.resp.ChargeId, again.resp.ChargeId)
	assert.EqualValues(t, 0, e2.svc.execs.Load())
}

func TestBoltFileModeAndLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "idem.db")
	openBolt(t, path)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, "-rw-------", fi.Mode().Perm().String())

	start := time.Now()
	_, err = boltstore.Open(path, boltstore.WithLockTimeout(200*time.Millisecond))
	require.ErrorIs(t, err, boltstore.ErrLocked)
	assert.Contains(t, err.Error(), path)
	assert.Less(t, time.Since(start), 30*time.Second, "fails instead of hanging")
}

func TestExpiredRecordRunsAgain(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{server: []idempotency.Option{idempotency.WithRetention(100 * time.Millisecond)}})
		ctx := withKey(testCtx(t), "short-lived")
		first := charge(ctx, e, chargeReq)
		require.NoError(t, first.err)
		time.Sleep(150 * time.Millisecond)
		again := charge(ctx, e, chargeReq)
		require.NoError(t, again.err)
		assert.False(t, idempotency.IsReplayed(again.header), "an expired record acts as if it never existed")
		assert.NotEqual(t, first.resp.ChargeId, again.resp.ChargeId)
		assert.EqualValues(t, 2, e.svc.execs.Load())
	})
}

func TestBoltSweepDeletesExpired(t *testing.T) {
	s := openBolt(t, filepath.Join(t.TempDir(), "idem.db"), boltstore.WithSweepBatch(3))
	e := newEnv(t, s, envConfig{server: []idempotency.Option{idempotency.WithRetention(50 * time.Millisecond)}})
	for i := range 10 {
		require.NoError(t, charge(withKey(testCtx(t), "k"+string(rune('a'+i))), e, chargeReq).err)
	}
	time.Sleep(100 * time.Millisecond)
	n, err := s.Sweep()
	require.NoError(t, err)
	assert.Equal(t, 10, n, "sweeps in batches of 3 until done")
	n, err = s.Sweep()
	require.NoError(t, err)
	assert.Zero(t, n)
}

func TestCallerCancelsMidHandler(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		e.svc.hold = make(chan struct{})
		e.svc.started = make(chan struct{}, 1)
		ctx, cancel := context.WithCancel(withKey(testCtx(t), "hangup"))
		done := make(chan answer, 1)
		go func() { done <- charge(ctx, e, chargeReq) }()
		<-e.svc.started
		cancel()
		a := <-done
		require.Equal(t, codes.Canceled, status.Code(a.err))
		close(e.svc.hold) // the handler finishes after its caller left

		again := charge(withKey(testCtx(t), "hangup"), e, chargeReq)
		require.NoError(t, again.err)
		assert.True(t, idempotency.IsReplayed(again.header), "the outcome was saved although the caller hung up")
		assert.EqualValues(t, 1, e.svc.execs.Load())
	})
}

func TestStoreDownFailClosedAndOpen(t *testing.T) {
	var events []idempotency.Event
	var mu sync.Mutex
	observe := idempotency.WithObserver(func(_ context.Context, ev idempotency.Event) {
		mu.Lock()
		events = append(events, ev)
		mu.Unlock()
	})
	store := failingStore{memstore.New()}
	closed := newEnv(t, store, envConfig{server: []idempotency.Option{observe}})
	a := charge(withKey(testCtx(t), "k"), closed, chargeReq)
	require.Equal(t, codes.Unavailable, status.Code(a.err))
	assert.Contains(t, status.Convert(a.err).Message(), "connection refused")
	assert.EqualValues(t, 0, closed.svc.execs.Load(), "fail-closed does not run the handler")

	open := newEnv(t, store, envConfig{server: []idempotency.Option{observe, idempotency.WithFailOpen()}})
	b := charge(withKey(testCtx(t), "k"), open, chargeReq)
	require.NoError(t, b.err)
	assert.EqualValues(t, 1, open.svc.execs.Load(), "fail-open runs the handler")

	mu.Lock()
	defer mu.Unlock()
	require.Len(t, events, 2)
	assert.Equal(t, idempotency.EventStoreError, events[0].Kind)
	assert.Equal(t, idempotency.EventFailOpen, events[1].Kind)
	assert.ErrorIs(t, events[1].Err, errStoreDown)
}

func TestObserverSeesEveryOutcome(t *testing.T) {
	var mu sync.Mutex
	kinds := map[idempotency.EventKind]int{}
	e := newEnv(t, memstore.New(), envConfig{server: []idempotency.Option{
		idempotency.WithObserver(func(_ context.Context, ev idempotency.Event) {
			mu.Lock()
			kinds[ev.Kind]++
			mu.Unlock()
		}),
		idempotency.WithMaxRecordSize(10),
	}})
	ctx := withKey(testCtx(t), "k")
	require.NoError(t, charge(ctx, e, chargeReq).err) // too large to store
	// A status-only record refuses the duplicate instead of running it again.
	err := charge(ctx, e, chargeReq).err
	require.Equal(t, codes.FailedPrecondition, status.Code(err), "%v", err)
	assert.Contains(t, status.Convert(err).Message(), "too large to store")
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, 1, kinds[idempotency.EventExecuted])
	assert.Equal(t, 1, kinds[idempotency.EventRecordTooLarge])
	assert.Equal(t, 1, kinds[idempotency.EventReplayed])
	assert.EqualValues(t, 1, e.svc.execs.Load())
}

// The status-only record of an outcome too large to store keeps the start of
// a long status message, cut where a character starts.
func TestOversizedErrorWithLongMessageKeepsStatusOnlyRecord(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{server: []idempotency.Option{idempotency.WithMaxRecordSize(1500)}})
		ctx := withKey(testCtx(t), "long-1")
		req := &testpb.ChargeRequest{Account: "long-message", AmountCents: 5}
		first := charge(ctx, e, req)
		require.Equal(t, codes.InvalidArgument, status.Code(first.err))
		again := charge(ctx, e, req)
		require.Equal(t, codes.FailedPrecondition, status.Code(again.err), "%v", again.err)
		assert.Contains(t, status.Convert(again.err).Message(), "too large to store")
		assert.EqualValues(t, 1, e.svc.execs.Load())
	})
}

func TestExecutionInHandlerContext(t *testing.T) {
	e := newEnv(t, memstore.New(), envConfig{})
	require.NoError(t, charge(withKey(testCtx(t), "exec-1"), e, chargeReq).err)
	require.NoError(t, charge(testCtx(t), e, chargeReq).err)
	execs := e.svc.seenExecutions()
	require.Len(t, execs, 2)
	require.NotNil(t, execs[0])
	assert.Equal(t, "exec-1", execs[0].Key)
	assert.Equal(t, idempotency.StoreKey("", "exec-1"), execs[0].StoreKey)
	assert.Equal(t, testpb.PaymentService_Charge_FullMethodName, execs[0].Method)
	assert.NotEmpty(t, execs[0].Token)
	assert.Nil(t, execs[1], "a call without a key has no Execution")
}

// recoverUnary and recoverStream turn a handler's panic into Internal, as
// recovery interceptors do; they sit outside the idempotency interceptors.
func recoverUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = status.Errorf(codes.Internal, "panic: %v", p)
		}
	}()
	return h(ctx, req)
}

func recoverStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = status.Errorf(codes.Internal, "panic: %v", p)
		}
	}()
	return h(srv, ss)
}

func TestHandlerPanicReleasesKey(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		store := newStore(t)
		var executed []idempotency.Event
		var mu sync.Mutex
		e := newEnv(t, store, envConfig{
			server: []idempotency.Option{idempotency.WithObserver(func(_ context.Context, ev idempotency.Event) {
				if ev.Kind == idempotency.EventExecuted {
					mu.Lock()
					executed = append(executed, ev)
					mu.Unlock()
				}
			})},
			// Registered first, so they run outside the idempotency interceptors.
			serverOpt: []grpc.ServerOption{grpc.ChainUnaryInterceptor(recoverUnary), grpc.ChainStreamInterceptor(recoverStream)},
		})
		e.svc.panicOnce.Store(true)
		ctx := withKey(testCtx(t), "boom")
		a := charge(ctx, e, chargeReq)
		require.Equal(t, codes.Internal, status.Code(a.err))
		assert.Contains(t, status.Convert(a.err).Message(), "panic")

		entry, err := store.Lookup(testCtx(t), idempotency.StoreKey("", "boom"))
		require.NoError(t, err)
		assert.Equal(t, idempotency.Absent, entry.State, "a panicking handler's key is released")
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		b := charge(wctx, e, chargeReq)
		require.NoError(t, b.err, "the retry runs at once instead of waiting for the lease")
		assert.False(t, idempotency.IsReplayed(b.header))

		e.svc.panicOnce.Store(true)
		sctx := withKey(testCtx(t), "boom-stream")
		stream, err := e.client.ChargeInstallments(sctx, &testpb.InstallmentsRequest{Account: "a", AmountCents: 10, Count: 2})
		require.NoError(t, err)
		_, err = stream.Recv()
		require.Equal(t, codes.Internal, status.Code(err))
		entry, err = store.Lookup(testCtx(t), idempotency.StoreKey("", "boom-stream"))
		require.NoError(t, err)
		assert.Equal(t, idempotency.Absent, entry.State)

		mu.Lock()
		defer mu.Unlock()
		require.Len(t, executed, 3)
		assert.Equal(t, codes.Internal, executed[0].Code)
		assert.False(t, executed[0].Stored)
		assert.ErrorContains(t, executed[0].Err, "panicked")
	})
}

// rollbackStore fails Complete as a transactional store does when the
// handler's transaction could not commit.
type rollbackStore struct {
	idempotency.Store
	fail atomic.Bool
}

func (s *rollbackStore) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	if s.fail.CompareAndSwap(true, false) {
		return fmt.Errorf("commit: connection reset: %w", idempotency.ErrRolledBack)
	}
	return s.Store.Complete(ctx, key, token, record, retention)
}

func TestRolledBackCompleteAbortsAndReleases(t *testing.T) {
	store := &rollbackStore{Store: memstore.New()}
	store.fail.Store(true)
	e := newEnv(t, store, envConfig{})
	ctx := withKey(testCtx(t), "tx-1")
	a := charge(ctx, e, chargeReq)
	require.Equal(t, codes.Aborted, status.Code(a.err), "nothing happened, so the caller must retry")
	assert.Contains(t, status.Convert(a.err).Message(), "rolled back")
	entry, err := store.Lookup(testCtx(t), idempotency.StoreKey("", "tx-1"))
	require.NoError(t, err)
	assert.Equal(t, idempotency.Absent, entry.State, "the key is released at once")

	b := charge(ctx, e, chargeReq)
	require.NoError(t, b.err)
	assert.False(t, idempotency.IsReplayed(b.header))
	c := charge(ctx, e, chargeReq)
	require.NoError(t, c.err)
	assert.True(t, idempotency.IsReplayed(c.header))
	assert.EqualValues(t, 2, e.svc.execs.Load())
}
