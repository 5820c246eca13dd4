package idempotency_test

import (
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"

	"github.com/grpcidem/idempotency/memstore"
)

var (
	installmentsReq = &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 10_000, Currency: "EUR", Count: 4}
	batchReqs       = []*testpb.ChargeRequest{
		{Account: "acct_1", AmountCents: 100, Currency: "EUR"},
		{Account: "acct_2", AmountCents: 200, Currency: "EUR"},
		{Account: "acct_3", AmountCents: 300, Currency: "USD"},
	}
	// badBatchReqs fails on its second message, with error details.
	badBatchReqs = []*testpb.ChargeRequest{batchReqs[0], {Account: "", AmountCents: 5}, batchReqs[2]}
)

// streamAnswer is what a client saw of one stream: every response,
// marshalled, then header, trailer and status.
type streamAnswer struct {
	msgs            [][]byte
	ids             []string // the responses' charge ids, in order
	header, trailer metadata.MD
	err             error
}

func (a *streamAnswer) add(t testing.TB, m *testpb.ChargeResponse) {
	a.msgs = append(a.msgs, mustMarshal(t, m))
	a.ids = append(a.ids, m.ChargeId)
}

// finish reads the end of a stream: header, trailer and status.
func (a *streamAnswer) finish(cs grpc.ClientStream, err error) streamAnswer {
	if errors.Is(err, io.EOF) {
		err = nil
	}
	a.err = err
	a.header, _ = cs.Header()
	a.trailer = cs.Trailer()
	return *a
}

func installments(t testing.TB, ctx context.Context, e *env, req *testpb.InstallmentsRequest, opts ...grpc.CallOption) streamAnswer {
	var a streamAnswer
	stream, err := e.client.ChargeInstallments(ctx, req, opts...)
	if err != nil {
		return streamAnswer{err: err}
	}
	for {
		m, err := stream.Recv()
		if err != nil {
			return a.finish(stream, err)
		}
		a.add(t, m)
	}
}

func batch(t testing.TB, ctx context.Context, e *env, reqs []*testpb.ChargeRequest, opts ...grpc.CallOption) streamAnswer {
	var a streamAnswer
	stream, err := e.client.ChargeBatch(ctx, opts...)
	if err != nil {
		return streamAnswer{err: err}
	}
	for _, r := range reqs {
		if err := stream.Send(r); err != nil {
			break // the status comes from CloseAndRecv
		}
	}
	resp, err := stream.CloseAndRecv()
	if err == nil {
		a.msgs = [][]byte{mustMarshal(t, resp)}
		for _, c := range resp.Charges {
			a.ids = append(a.ids, c.ChargeId)
		}
	}
	return a.finish(stream, err)
}

// interactive runs a bidi stream. With lockstep, it waits for each answer
// before it sends the next request, as a conversational client does;
// otherwise it sends everything, then reads.
func interactive(t testing.TB, ctx context.Context, e *env, reqs []*testpb.ChargeRequest, lockstep bool, opts ...grpc.CallOption) streamAnswer {
	var a streamAnswer
	stream, err := e.client.ChargeInteractive(ctx, opts...)
	if err != nil {
		return streamAnswer{err: err}
	}
	for _, r := range reqs {
		if err := stream.Send(r); err != nil {
			break
		}
		if lockstep {
			m, err := stream.Recv()
			if err != nil {
				return a.finish(stream, err)
			}
			a.add(t, m)
		}
	}
	if err := stream.CloseSend(); err != nil {
		return a.finish(stream, err)
	}
	for {
		m, err := stream.Recv()
		if err != nil {
			return a.finish(stream, err)
		}
		a.add(t, m)
	}
}

// sameMD compares metadata as a client sees it; no metadata and empty
// metadata are the same.
func sameMD(t testing.TB, want, got metadata.MD, msgAndArgs ...any) {
	t.Helper()
	if len(want) == 0 && len(got) == 0 {
		return
	}
	assert.Equal(t, want, got, msgAndArgs...)
}

// assertReplayOf checks that again is a byte-identical replay of first.
func assertReplayOf(t testing.TB, first, again streamAnswer) {
	t.Helper()
	assert.False(t, idempotency.IsReplayed(first.header), "the first execution must not carry the replay header")
	assert.Empty(t, first.header.Get(idempotency.ReplayedHeader))
	assert.True(t, idempotency.IsReplayed(again.header), "a replay carries the replay header")
	assert.Equal(t, first.msgs, again.msgs, "every message, in order, byte for byte")
	sameMD(t, stripped(first.header), stripped(again.header), "header")
	// A first execution that failed before it sent anything answers with
	// trailers only, which carry gRPC's content-type; a replay cannot, as
	// it sends the replay header first.
	sameMD(t, stripped(first.trailer), stripped(again.trailer), "trailer")
	if first.err == nil {
		assert.NoError(t, again.err)
	} else {
		assert.Equal(t, statusBytes(t, first.err), statusBytes(t, again.err), "code, message and details")
	}
}

func TestServerStreamReplayIsByteIdentical(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})

		ctx := withKey(testCtx(t), "plan-1")
		first := installments(t, ctx, e, installmentsReq)
		require.NoError(t, first.err)
		require.Len(t, first.msgs, 4)
		require.Equal(t, []string{"installments"}, first.header.Get("x-plan"), "the handler's header reaches the client")
		require.Equal(t, []string{"done"}, first.trailer.Get("x-count"))
		for range 3 {
			assertReplayOf(t, first, installments(t, ctx, e, installmentsReq))
		}
		assert.EqualValues(t, 1, e.svc.execs.Load())

		bad := &testpb.InstallmentsRequest{Account: "", AmountCents: 10, Count: 2}
		ctx = withKey(testCtx(t), "plan-bad")
		first = installments(t, ctx, e, bad)
		require.Equal(t, codes.InvalidArgument, status.Code(first.err))
		require.NotEmpty(t, status.Convert(first.err).Details())
		assertReplayOf(t, first, installments(t, ctx, e, bad))
		assert.EqualValues(t, 2, e.svc.execs.Load())
	})
}

func TestClientStreamReplayIsByteIdentical(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})

		ctx := withKey(testCtx(t), "batch-1")
		first := batch(t, ctx, e, batchReqs)
		require.NoError(t, first.err)
		require.Len(t, first.ids, 3)
		require.Equal(t, []string{"1"}, first.header.Get("x-batch"), "the handler's header reaches the client")
		for range 3 {
			assertReplayOf(t, first, batch(t, ctx, e, batchReqs))
		}
		assert.EqualValues(t, 1, e.svc.execs.Load())

		ctx = withKey(testCtx(t), "batch-bad")
		first = batch(t, ctx, e, badBatchReqs)
		require.Equal(t, codes.InvalidArgument, status.Code(first.err))
		require.NotEmpty(t, status.Convert(first.err).Details())
		assertReplayOf(t, first, batch(t, ctx, e, badBatchReqs))
		assert.EqualValues(t, 2, e.svc.execs.Load())
	})
}

func TestBidiStreamReplayIsByteIdentical(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})

		ctx := withKey(testCtx(t), "chat-1")
		first := interactive(t, ctx, e, batchReqs, false)
		require.NoError(t, first.err)
		require.Len(t, first.msgs, 3)
		require.Equal(t, []string{"closed"}, first.trailer.Get("x-interactive"), "the handler's trailer reaches the client")
		for range 3 {
			assertReplayOf(t, first, interactive(t, ctx, e, batchReqs, false))
		}
		assert.EqualValues(t, 1, e.svc.execs.Load())

		// An error after the first answer: one message, then the status.
		ctx = withKey(testCtx(t), "chat-bad")
		first = interactive(t, ctx, e, badBatchReqs, false)
		require.Equal(t, codes.InvalidArgument, status.Code(first.err))
		require.NotEmpty(t, status.Convert(first.err).Details())
		require.Len(t, first.msgs, 1)
		assertReplayOf(t, first, interactive(t, ctx, e, badBatchReqs, false))
		assert.EqualValues(t, 2, e.svc.execs.Load())
	})
}

// waitCounter is a Store that counts the callers blocked in Wait, so that a
// test can tell when its duplicates are all queued behind a first execution.
type waitCounter struct {
	idempotency.Store
	waiting atomic.Int64
}

func (w *waitCounter) Wait(ctx context.Context, key string, seen idempotency.Entry) error {
	w.waiting.Add(1)
	defer w.waiting.Add(-1)
	return w.Store.Wait(ctx, key, seen)
}

func TestServerStreamConcurrentDuplicates(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		store := &waitCounter{Store: newStore(t)}
		e := newEnv(t, store, envConfig{})
		e.svc.hold = make(chan struct{})
		e.svc.started = make(chan struct{}, 1)
		ctx := withKey(testCtx(t), "same-plan")
		const n = 200
		answers := make([]streamAnswer, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { answers[i] = installments(t, ctx, e, installmentsReq) })
		}
		<-e.svc.started
		require.Eventually(t, func() bool { return store.waiting.Load() == n-1 }, 60*time.Second, time.Millisecond,
			"every duplicate queues behind the first execution")
		close(e.svc.hold)
		wg.Wait()

		require.EqualValues(t, 1, e.svc.execs.Load(), "exactly one execution")
		replays := 0
		for _, a := range answers {
			require.NoError(t, a.err)
			require.Len(t, a.msgs, int(installmentsReq.Count))
			assert.Equal(t, answers[0].msgs, a.msgs, "the same messages in the same order")
			if idempotency.IsReplayed(a.header) {
				replays++
			}
		}
		assert.Equal(t, n-1, replays, "every stream but the first is a replay")
	})
}

func TestStreamInputMismatch(t *testing.T) {
	changed := []*testpb.ChargeRequest{batchReqs[0], {Account: "acct_2", AmountCents: 201, Currency: "EUR"}, batchReqs[2]}
	cases := map[string][]*testpb.ChargeRequest{
		"one message changed": changed,
		"one message missing": batchReqs[:2],
		"one message extra":   append(append([]*testpb.ChargeRequest(nil), batchReqs...), batchReqs[0]),
		"reordered":           {batchReqs[1], batchReqs[0], batchReqs[2]},
		"none":                nil,
	}
	run := map[string]func(t testing.TB, ctx context.Context, e *env, reqs []*testpb.ChargeRequest) streamAnswer{
		"client stream": func(t testing.TB, ctx context.Context, e *env, reqs []*testpb.ChargeRequest) streamAnswer {
			return batch(t, ctx, e, reqs)
		},
		"bidi": func(t testing.TB, ctx context.Context, e *env, reqs []*testpb.ChargeRequest) streamAnswer {
			return interactive(t, ctx, e, reqs, false)
		},
	}
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		for kind, call := range run {
			t.Run(kind, func(t *testing.T) {
				var mismatches, replays atomic.Int64
				e := newEnv(t, newStore(t), envConfig{server: []idempotency.Option{idempotency.WithObserver(func(_ context.Context, ev idempotency.Event) {
					switch ev.Kind {
					case idempotency.EventMismatch:
						mismatches.Add(1)
					case idempotency.EventReplayed:
						replays.Add(1)
					}
				})}})
				ctx := withKey(testCtx(t), "inputs")
				first := call(t, ctx, e, batchReqs)
				require.NoError(t, first.err)
				for name, reqs := range cases {
					a := call(t, ctx, e, reqs)
					require.Equal(t, codes.FailedPrecondition, status.Code(a.err), "%s: %v", name, a.err)
					assert.Contains(t, status.Convert(a.err).Message(), "different request", name)
				}
				assert.EqualValues(t, len(cases), mismatches.Load(), "each mismatch is observed")
				assert.Zero(t, replays.Load(), "a mismatch is not also counted as a replay")
				assert.EqualValues(t, 1, e.svc.execs.Load(), "the handler does not run for a mismatch")
				assertReplayOf(t, first, call(t, ctx, e, batchReqs))
				assert.EqualValues(t, 1, replays.Load(), "the matching duplicate is a replay")
			})
		}
	})
}

// A first execution that stopped reading early (its handler failed on the
// second message) is matched on what it read: the same first two messages
// replay its outcome, whatever follows them.
func TestClientStreamMatchesWhatTheHandlerRead(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		ctx := withKey(testCtx(t), "early-error")
		first := batch(t, ctx, e, badBatchReqs)
		require.Equal(t, codes.InvalidArgument, status.Code(first.err))
		assertReplayOf(t, first, batch(t, ctx, e, badBatchReqs[:2]))
		a := batch(t, ctx, e, badBatchReqs[:1])
		assert.Equal(t, codes.FailedPrecondition, status.Code(a.err), "one message missing: %v", a.err)
		assert.EqualValues(t, 1, e.svc.execs.Load())
	})
}

func TestStreamReusingAnotherCallsKey(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		ctx := withKey(testCtx(t), "unary-key")
		require.NoError(t, charge(ctx, e, chargeReq).err)

		for name, a := range map[string]streamAnswer{
			"server stream": installments(t, ctx, e, installmentsReq),
			"client stream": batch(t, ctx, e, batchReqs),
			"bidi":          interactive(t, ctx, e, batchReqs, false),
		} {
			require.Equal(t, codes.FailedPrecondition, status.Code(a.err), "%s: %v", name, a.err)
			assert.Contains(t, status.Convert(a.err).Message(), testpb.PaymentService_Charge_FullMethodName, name)
			assert.Empty(t, a.msgs, "%s: no stored message leaks to another method", name)
		}
		assert.EqualValues(t, 1, e.svc.execs.Load())

		// And the other way round: a unary call reusing a stream's key.
		ctx = withKey(testCtx(t), "stream-key")
		require.NoError(t, batch(t, ctx, e, batchReqs).err)
		a := charge(ctx, e, chargeReq)
		require.Equal(t, codes.FailedPrecondition, status.Code(a.err))
		assert.Contains(t, status.Convert(a.err).Message(), testpb.PaymentService_ChargeBatch_FullMethodName)
		b := installments(t, ctx, e, installmentsReq)
		require.Equal(t, codes.FailedPrecondition, status.Code(b.err))
		assert.EqualValues(t, 2, e.svc.execs.Load())
	})
}

// events collects what an observer sees.
type events struct {
	mu  sync.Mutex
	all []idempotency.Event
	// executed receives every EventExecuted, which comes after the outcome
	// was stored or its key released.
	executed chan idempotency.Event
}

func newEvents() *events { return &events{executed: make(chan idempotency.Event, 100)} }

func (ev *events) option() idempotency.Option {
	return idempotency.WithObserver(func(_ context.Context, e idempotency.Event) {
		ev.mu.Lock()
		ev.all = append(ev.all, e)
		ev.mu.Unlock()
		if e.Kind == idempotency.EventExecuted {
			ev.executed <- e
		}
	})
}

func (ev *events) of(kind idempotency.EventKind) []idempotency.Event {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	var out []idempotency.Event
	for _, e := range ev.all {
		if e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}

func (ev *events) nextExecuted(t testing.TB) idempotency.Event {
	t.Helper()
	select {
	case e := <-ev.executed:
		return e
	case <-time.After(60 * time.Second):
		t.Fatal("no EventExecuted")
		return idempotency.Event{}
	}
}

func lookup(t testing.TB, store idempotency.Store, key string) idempotency.State {
	t.Helper()
	e, err := store.Lookup(testCtx(t), idempotency.StoreKey("", key))
	require.NoError(t, err)
	return e.State
}

func TestStreamRecordingBound(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		type bound struct {
			name string
			opt  idempotency.Option
			// fits and outgrows are installment counts within and past
			// the bound; fits 0 means none fits.
			fits, outgrows int32
			want           string
		}
		// An installment is 37 bytes, and a record holds a header, a
		// trailer, a fingerprint and timestamps besides, about 170 bytes.
		for _, b := range []bound{
			{"messages", idempotency.WithMaxStreamMessages(5), 5, 6, "more than 5 messages"},
			{"bytes sent", idempotency.WithMaxRecordSize(600), 4, 30, "more than 600 bytes"},
			// What was sent fits, but not the whole record.
			{"record bytes", idempotency.WithMaxRecordSize(200), 0, 4, "exceeds the limit of 200"},
		} {
			t.Run(b.name, func(t *testing.T) {
				ev := newEvents()
				store := newStore(t)
				e := newEnv(t, store, envConfig{server: []idempotency.Option{b.opt, ev.option()}})

				req := &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 10_000, Currency: "EUR", Count: b.fits}
				execs := int64(2)
				if b.fits > 0 {
					ctx := withKey(testCtx(t), "fits")
					first := installments(t, ctx, e, req)
					require.NoError(t, first.err)
					assert.True(t, ev.nextExecuted(t).Stored)
					assertReplayOf(t, first, installments(t, ctx, e, req))
					execs++
				}

				req.Count = b.outgrows
				ctx := withKey(testCtx(t), "outgrows")
				first := installments(t, ctx, e, req)
				require.NoError(t, first.err)
				require.Len(t, first.msgs, int(b.outgrows), "the first caller gets the whole stream")
				executed := ev.nextExecuted(t)
				assert.True(t, executed.Stored, "a status-only record is stored")
				tooLarge := ev.of(idempotency.EventRecordTooLarge)
				require.Len(t, tooLarge, 1)
				assert.ErrorContains(t, tooLarge[0].Err, b.want)
				assert.Equal(t, "outgrows", tooLarge[0].Key)

				// A duplicate is told why it cannot be replayed, and
				// the handler does not run a second time.
				again := installments(t, ctx, e, req)
				require.Equal(t, codes.FailedPrecondition, status.Code(again.err), "%v", again.err)
				assert.Contains(t, status.Convert(again.err).Message(), "too large to store")
				assert.Contains(t, status.Convert(again.err).Message(), b.want)
				assert.True(t, idempotency.IsReplayed(again.header))
				assert.Empty(t, again.msgs)
				execs--

				// WithRerunOversized releases the key instead: the retry
				// runs again.
				e2 := newEnv(t, newStore(t), envConfig{server: []idempotency.Option{b.opt, idempotency.WithRerunOversized()}})
				ctx2 := withKey(testCtx(t), "outgrows-rerun")
				first = installments(t, ctx2, e2, req)
				require.NoError(t, first.err)
				again = installments(t, ctx2, e2, req)
				require.NoError(t, again.err)
				assert.False(t, idempotency.IsReplayed(again.header), "a retry runs again")
				assert.NotEqual(t, first.ids, again.ids)
				assert.Equal(t, int64(2), e2.svc.execs.Load())
				assert.Equal(t, execs, e.svc.execs.Load())
			})
		}
	})
}

// A long stream past the bound costs the interceptor no more memory than the
// bound: it stops keeping what it recorded as soon as the stream outgrows it.
// The test measures the live heap while 10,000 messages of 4 KiB (40 MiB in
// all) pass through, with flow control windows pinned to 64 KiB so that
// gRPC's own buffers stay small.
func TestStreamRecordingMemoryIsBounded(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		const (
			count   = 10_000
			msgSize = 4 << 10
			bound   = 1 << 20
		)
		ev := newEvents()
		store := newStore(t)
		e := newEnv(t, store, envConfig{
			server:    []idempotency.Option{idempotency.WithMaxRecordSize(bound), idempotency.WithMaxStreamMessages(2 * count), ev.option()},
			client:    []grpc.DialOption{grpc.WithInitialWindowSize(64 << 10), grpc.WithInitialConnWindowSize(64 << 10)},
			serverOpt: []grpc.ServerOption{grpc.InitialWindowSize(64 << 10), grpc.InitialConnWindowSize(64 << 10)},
		})
		req := &testpb.InstallmentsRequest{Account: strings.Repeat("a", msgSize), AmountCents: count * 100, Currency: "EUR", Count: count}
		stream, err := e.client.ChargeInstallments(withKey(testCtx(t), "long"), req)
		require.NoError(t, err)
		before := liveHeap()
		var peak uint64
		n := 0
		for {
			_, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			require.NoError(t, err)
			n++
			// The handler is still sending: what the interceptor keeps is live.
			if n%2_000 == 0 {
				peak = max(peak, liveHeap())
			}
		}
		require.Equal(t, count, n, "the caller gets every message")
		assert.True(t, ev.nextExecuted(t).Stored, "a status-only record")
		require.Len(t, ev.of(idempotency.EventRecordTooLarge), 1)
		stored, err := store.Lookup(testCtx(t), idempotency.StoreKey("", "long"))
		require.NoError(t, err)
		require.Equal(t, idempotency.Completed, stored.State)
		assert.Less(t, len(stored.Record), 1024, "the record keeps the status only")

		growth := int64(peak) - int64(before)
		t.Logf("live heap grew by %d KiB while %d MiB passed through", growth>>10, count*msgSize>>20)
		// Keeping the stream would hold over 30 MiB at the last sample.
		assert.Less(t, growth, int64(12<<20), "the interceptor holds no more than its bound")
	})
}

func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func TestBidiLockstepClient(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		// The deadline turns a deadlock into a failure rather than a hang.
		ctx, cancel := context.WithTimeout(withKey(testCtx(t), "lockstep"), 20*time.Second)
		defer cancel()
		first := interactive(t, ctx, e, batchReqs, true)
		require.NoError(t, first.err, "first execution")
		require.Len(t, first.msgs, 3)
		again := interactive(t, ctx, e, batchReqs, true)
		require.NoError(t, again.err, "replay")
		assertReplayOf(t, first, again)

		// A lockstep replay whose inputs differ ends too, refused.
		other := []*testpb.ChargeRequest{batchReqs[0], batchReqs[0], batchReqs[0]}
		a := interactive(t, ctx, e, other, true)
		assert.Equal(t, codes.FailedPrecondition, status.Code(a.err), "%v", a.err)
		assert.EqualValues(t, 1, e.svc.execs.Load())
	})
}

// windows pins flow control to 64 KiB, so that a server stream of 10,000
// installments (about 400 KiB) cannot all be buffered before the client reads.
var windows = envConfig{
	client:    []grpc.DialOption{grpc.WithInitialWindowSize(64 << 10), grpc.WithInitialConnWindowSize(64 << 10)},
	serverOpt: []grpc.ServerOption{grpc.InitialWindowSize(64 << 10), grpc.InitialConnWindowSize(64 << 10)},
}

func TestStreamClientCancelsMidStream(t *testing.T) {
	hangUps := map[string]func(t *testing.T, ctx context.Context, e *env){
		"server stream": func(t *testing.T, ctx context.Context, e *env) {
			stream, err := e.client.ChargeInstallments(ctx, &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 1_000_000, Currency: "EUR", Count: 10_000})
			require.NoError(t, err)
			for range 5 {
				_, err := stream.Recv()
				require.NoError(t, err)
			}
		},
		"client stream": func(t *testing.T, ctx context.Context, e *env) {
			stream, err := e.client.ChargeBatch(ctx)
			require.NoError(t, err)
			require.NoError(t, stream.Send(batchReqs[0]))
			require.NoError(t, stream.Send(batchReqs[1]))
			<-e.svc.started // the handler runs and waits for more
		},
		"bidi": func(t *testing.T, ctx context.Context, e *env) {
			stream, err := e.client.ChargeInteractive(ctx)
			require.NoError(t, err)
			require.NoError(t, stream.Send(batchReqs[0]))
			_, err = stream.Recv()
			require.NoError(t, err)
		},
	}
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		for name, hangUp := range hangUps {
			t.Run(name, func(t *testing.T) {
				ev := newEvents()
				store := newStore(t)
				cfg := windows
				cfg.server = []idempotency.Option{ev.option(), idempotency.WithMaxStreamMessages(20_000)}
				e := newEnv(t, store, cfg)
				if name == "client stream" {
					e.svc.started = make(chan struct{}, 2)
				}
				ctx, cancel := context.WithCancel(withKey(testCtx(t), "hangup"))
				hangUp(t, ctx, e)
				cancel()

				executed := ev.nextExecuted(t)
				retry := withKey(testCtx(t), "hangup")
				if name == "server stream" {
					// Nothing was cut short: the handler ran to its end
					// after its client left, its sends from then on were
					// recorded, and the retry replays all of it.
					assert.True(t, executed.Stored, "a handler that ran to its end is stored")
					assert.Equal(t, idempotency.Completed, lookup(t, store, "hangup"))
					a := installments(t, retry, e, &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 1_000_000, Currency: "EUR", Count: 10_000})
					require.NoError(t, a.err)
					assert.True(t, idempotency.IsReplayed(a.header))
					assert.Len(t, a.msgs, 10_000)
					assert.EqualValues(t, 1, e.svc.execs.Load())
					return
				}
				assert.False(t, executed.Stored, "a stream whose requests were cut short is not stored")
				assert.Equal(t, idempotency.Absent, lookup(t, store, "hangup"), "no partial record")

				// A retry runs the handler again, in full.
				var a streamAnswer
				switch name {
				case "client stream":
					a = batch(t, retry, e, batchReqs)
				case "bidi":
					a = interactive(t, retry, e, batchReqs, false)
					assert.Len(t, a.msgs, 3)
				}
				require.NoError(t, a.err)
				assert.False(t, idempotency.IsReplayed(a.header))
				assert.EqualValues(t, 2, e.svc.execs.Load())
				assert.True(t, ev.nextExecuted(t).Stored)
				assert.Equal(t, idempotency.Completed, lookup(t, store, "hangup"))
			})
		}
	})
}

// quitter is a PaymentService whose streams stop early when their client
// goes away, as handlers that watch their context often do: with OK, or,
// with sayWhy, with the context's error.
type quitter struct {
	testpb.UnimplementedPaymentServiceServer
	execs  atomic.Int64
	sayWhy bool
}

func (q *quitter) quit(ctx context.Context) error {
	<-ctx.Done()
	if q.sayWhy {
		return status.FromContextError(ctx.Err()).Err()
	}
	return nil
}

func (q *quitter) ChargeInstallments(req *testpb.InstallmentsRequest, ss grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
	q.execs.Add(1)
	for i := range req.Count {
		if i == 2 {
			return q.quit(ss.Context())
		}
		if err := ss.Send(&testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account, AmountCents: 1}); err != nil {
			return err
		}
	}
	return nil
}

func (q *quitter) ChargeInteractive(ss grpc.BidiStreamingServer[testpb.ChargeRequest, testpb.ChargeResponse]) error {
	q.execs.Add(1)
	req, err := ss.Recv()
	if err != nil {
		return err
	}
	if err := ss.Send(&testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account}); err != nil {
		return err
	}
	return q.quit(ss.Context())
}

// serve runs svc on bufconn behind the stream interceptor, for tests that
// need a service that behaves unlike payments.
func serve(t testing.TB, store idempotency.Store, svc testpb.PaymentServiceServer, opts []idempotency.Option, dialOpts ...grpc.DialOption) *env {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(grpc.ChainStreamInterceptor(mustServer(store, opts...).StreamServerInterceptor()))
	testpb.RegisterPaymentServiceServer(srv, svc)
	go func() { _ = srv.Serve(lis) }()
	dialOpts = append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, dialOpts...)
	conn, err := grpc.NewClient("passthrough:///bufnet", dialOpts...)
	require.NoError(t, err)
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
	})
	return &env{store: store, conn: conn, client: testpb.NewPaymentServiceClient(conn)}
}

// A stream handler that returns after its client went away is recorded as a
// unary one is: the interceptor cannot tell a handler that stopped early
// from one that finished, so what it returned is its outcome, stored if its
// code is cacheable. A handler that stopped because its client left says so
// with the context's error, which releases the key.
func TestStreamEndedByHangUpIsStoredAsReturned(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		for _, kind := range []string{"server stream", "bidi"} {
			for _, sayWhy := range []bool{false, true} {
				name := kind + "/returns OK"
				if sayWhy {
					name = kind + "/returns the context's error"
				}
				t.Run(name, func(t *testing.T) {
					ev := newEvents()
					store := newStore(t)
					q := &quitter{sayWhy: sayWhy}
					e := serve(t, store, q, []idempotency.Option{ev.option()})
					ctx, cancel := context.WithCancel(withKey(testCtx(t), "quit"))
					var first streamAnswer
					if kind == "server stream" {
						stream, err := e.client.ChargeInstallments(ctx, &testpb.InstallmentsRequest{Account: "acct_1", Count: 5})
						require.NoError(t, err)
						for range 2 {
							m, err := stream.Recv()
							require.NoError(t, err)
							first.add(t, m)
						}
					} else {
						stream, err := e.client.ChargeInteractive(ctx)
						require.NoError(t, err)
						require.NoError(t, stream.Send(batchReqs[0]))
						m, err := stream.Recv()
						require.NoError(t, err)
						first.add(t, m)
					}
					cancel()
					executed := ev.nextExecuted(t)
					if sayWhy {
						assert.Equal(t, codes.Canceled, executed.Code)
						assert.False(t, executed.Stored)
						assert.Equal(t, idempotency.Absent, lookup(t, store, "quit"), "the key is released for a retry")
						return
					}
					assert.Equal(t, codes.OK, executed.Code, "the handler returned OK")
					assert.True(t, executed.Stored, "so its outcome is stored")

					retry := withKey(testCtx(t), "quit")
					var again streamAnswer
					if kind == "server stream" {
						again = installments(t, retry, e, &testpb.InstallmentsRequest{Account: "acct_1", Count: 5})
					} else {
						again = interactive(t, retry, e, batchReqs[:1], false)
					}
					require.NoError(t, again.err)
					assert.True(t, idempotency.IsReplayed(again.header))
					assert.Equal(t, first.msgs, again.msgs, "what the handler sent before it returned")
					assert.EqualValues(t, 1, q.execs.Load())
				})
			}
		}
	})
}

func streamClientEnv(t *testing.T, store idempotency.Store, opts ...idempotency.CallOption) *env {
	return newEnv(t, store, envConfig{client: []grpc.DialOption{
		grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor(opts...)),
	}})
}

func TestStreamClientInterceptor(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		fast := idempotency.WithBackoff(time.Millisecond, 5*time.Millisecond)

		t.Run("fresh key per stream", func(t *testing.T) {
			e := streamClientEnv(t, newStore(t))
			require.NoError(t, installments(t, testCtx(t), e, installmentsReq).err)
			require.NoError(t, batch(t, testCtx(t), e, batchReqs).err)
			require.NoError(t, interactive(t, testCtx(t), e, batchReqs, false).err)
			keys := e.svc.seenKeys()
			require.Len(t, keys, 3)
			for _, k := range keys {
				assert.Len(t, k, 22)
				assert.NoError(t, idempotency.ValidateKey(k))
			}
			assert.NotEqual(t, keys[0], keys[1])
			assert.NotEqual(t, keys[1], keys[2])
		})

		t.Run("retries keep the key", func(t *testing.T) {
			e := streamClientEnv(t, newStore(t), idempotency.WithMaxAttempts(5), fast)
			e.svc.failFirst.Store(2)
			var attempts int
			replayed := true
			a := installments(t, testCtx(t), e, installmentsReq, idempotency.Attempts(&attempts), idempotency.Replayed(&replayed))
			require.NoError(t, a.err)
			assert.Len(t, a.msgs, int(installmentsReq.Count))
			assert.Equal(t, 3, attempts)
			assert.False(t, replayed, "the third attempt was the first to run to the end")
			keys := e.svc.seenKeys()
			require.Len(t, keys, 3)
			assert.Equal(t, keys[0], keys[1])
			assert.Equal(t, keys[0], keys[2])

			// The stream was stored under that key: asking again replays it.
			again := installments(t, withKey(testCtx(t), keys[0]), e, installmentsReq, idempotency.Attempts(&attempts), idempotency.Replayed(&replayed))
			assertReplayOf(t, a, again)
			assert.True(t, replayed)
			assert.Equal(t, 1, attempts)
			assert.EqualValues(t, 3, e.svc.execs.Load())
		})

		t.Run("retries run out", func(t *testing.T) {
			e := streamClientEnv(t, newStore(t), idempotency.WithMaxAttempts(3), fast)
			e.svc.failFirst.Store(1 << 30)
			var attempts int
			a := installments(t, testCtx(t), e, installmentsReq, idempotency.Attempts(&attempts))
			assert.Equal(t, codes.Unavailable, status.Code(a.err))
			assert.Equal(t, 3, attempts)
			assert.EqualValues(t, 3, e.svc.execs.Load())
		})

		t.Run("WithKey and Replayed", func(t *testing.T) {
			e := streamClientEnv(t, newStore(t))
			var replayed bool
			var attempts int
			first := installments(t, testCtx(t), e, installmentsReq, idempotency.WithKey("plan-7"), idempotency.Replayed(&replayed), idempotency.Attempts(&attempts))
			require.NoError(t, first.err)
			assert.False(t, replayed)
			assert.Equal(t, 1, attempts)
			again := installments(t, testCtx(t), e, installmentsReq, idempotency.WithKey("plan-7"), idempotency.Replayed(&replayed))
			assertReplayOf(t, first, again)
			assert.True(t, replayed)

			b := batch(t, testCtx(t), e, batchReqs, idempotency.WithKey("batch-7"), idempotency.Replayed(&replayed))
			require.NoError(t, b.err)
			assert.False(t, replayed)
			assertReplayOf(t, b, batch(t, testCtx(t), e, batchReqs, idempotency.WithKey("batch-7"), idempotency.Replayed(&replayed)))
			assert.True(t, replayed)

			c := interactive(t, testCtx(t), e, batchReqs, true, idempotency.WithKey("chat-7"), idempotency.Replayed(&replayed))
			require.NoError(t, c.err)
			assert.False(t, replayed)
			assertReplayOf(t, c, interactive(t, testCtx(t), e, batchReqs, true, idempotency.WithKey("chat-7"), idempotency.Replayed(&replayed)))
			assert.True(t, replayed)

			// A key already in the outgoing metadata is kept.
			require.NoError(t, installments(t, withKey(testCtx(t), "from-metadata"), e, installmentsReq).err)
			assert.Equal(t, []string{"plan-7", "batch-7", "chat-7", "from-metadata"}, e.svc.seenKeys())
			assert.EqualValues(t, 4, e.svc.execs.Load())
		})

		t.Run("streams with client messages are not retried", func(t *testing.T) {
			e := streamClientEnv(t, newStore(t), idempotency.WithMaxAttempts(5), fast)
			e.svc.failFirst.Store(2)
			var attempts int
			a := batch(t, testCtx(t), e, batchReqs, idempotency.Attempts(&attempts))
			assert.Equal(t, codes.Unavailable, status.Code(a.err))
			assert.Equal(t, 1, attempts)
			b := interactive(t, testCtx(t), e, batchReqs, false, idempotency.Attempts(&attempts))
			assert.Equal(t, codes.Unavailable, status.Code(b.err))
			assert.Equal(t, 1, attempts)
			assert.EqualValues(t, 2, e.svc.execs.Load())
		})

		t.Run("WithoutKey", func(t *testing.T) {
			e := streamClientEnv(t, newStore(t), idempotency.WithMaxAttempts(5), fast)
			e.svc.failFirst.Store(1)
			a := installments(t, testCtx(t), e, installmentsReq, idempotency.WithoutKey())
			assert.Equal(t, codes.Unavailable, status.Code(a.err), "no key, no retry: a retry would not be safe")
			assert.Empty(t, e.svc.seenKeys())
			assert.EqualValues(t, 1, e.svc.execs.Load())
		})
	})
}

// failsMidStream sends one installment, then fails with a retryable code.
type failsMidStream struct {
	testpb.UnimplementedPaymentServiceServer
	execs atomic.Int64
}

func (f *failsMidStream) ChargeInstallments(req *testpb.InstallmentsRequest, ss grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
	f.execs.Add(1)
	if err := ss.Send(&testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account}); err != nil {
		return err
	}
	return status.Error(codes.Unavailable, "bank link lost")
}

// Once a response has arrived, a retry would show the caller some messages
// twice, so the client does not retry.
func TestStreamClientNoRetryAfterFirstMessage(t *testing.T) {
	f := &failsMidStream{}
	e := serve(t, memstore.New(), f, nil, grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor(
		idempotency.WithMaxAttempts(5), idempotency.WithBackoff(time.Millisecond, time.Millisecond))))
	var attempts int
	a := installments(t, testCtx(t), e, installmentsReq, idempotency.Attempts(&attempts))
	assert.Equal(t, codes.Unavailable, status.Code(a.err))
	assert.Len(t, a.msgs, 1)
	assert.Equal(t, 1, attempts)
	assert.EqualValues(t, 1, f.execs.Load())
}

func TestStreamStoreDown(t *testing.T) {
	store := failingStore{memstore.New()}
	ev := newEvents()
	closed := newEnv(t, store, envConfig{server: []idempotency.Option{ev.option()}})
	ctx := withKey(testCtx(t), "k")
	for name, a := range map[string]streamAnswer{
		"server stream": installments(t, ctx, closed, installmentsReq),
		"client stream": batch(t, ctx, closed, batchReqs),
		"bidi":          interactive(t, ctx, closed, batchReqs, false),
	} {
		assert.Equal(t, codes.Unavailable, status.Code(a.err), name)
		assert.Empty(t, a.msgs, name)
	}
	assert.EqualValues(t, 0, closed.svc.execs.Load(), "fail-closed does not run the handler")
	assert.Len(t, ev.of(idempotency.EventStoreError), 3)

	open := newEnv(t, store, envConfig{server: []idempotency.Option{ev.option(), idempotency.WithFailOpen()}})
	// The server stream's request was read before the store was asked; the
	// handler must still get it.
	a := installments(t, ctx, open, installmentsReq)
	require.NoError(t, a.err)
	require.Len(t, a.msgs, int(installmentsReq.Count))
	b := batch(t, ctx, open, batchReqs)
	require.NoError(t, b.err)
	assert.Len(t, b.ids, 3)
	c := interactive(t, ctx, open, batchReqs, true)
	require.NoError(t, c.err)
	assert.Len(t, c.msgs, 3)
	assert.EqualValues(t, 3, open.svc.execs.Load(), "fail-open runs the handler")
	assert.Len(t, ev.of(idempotency.EventFailOpen), 3)
}

func TestStreamWithoutKey(t *testing.T) {
	e := newEnv(t, memstore.New(), envConfig{})
	for range 2 {
		a := installments(t, testCtx(t), e, installmentsReq)
		require.NoError(t, a.err)
		assert.False(t, idempotency.IsReplayed(a.header))
		require.NoError(t, batch(t, testCtx(t), e, batchReqs).err)
		require.NoError(t, interactive(t, testCtx(t), e, batchReqs, true).err)
	}
	assert.EqualValues(t, 6, e.svc.execs.Load(), "without a key, streams run as without the interceptor")

	r := newEnv(t, memstore.New(), envConfig{server: []idempotency.Option{idempotency.WithRequiredKey("*")}})
	for name, a := range map[string]streamAnswer{
		"server stream": installments(t, testCtx(t), r, installmentsReq),
		"client stream": batch(t, testCtx(t), r, batchReqs),
		"bidi":          interactive(t, testCtx(t), r, batchReqs, false),
	} {
		require.Equal(t, codes.InvalidArgument, status.Code(a.err), name)
		assert.Contains(t, status.Convert(a.err).Message(), idempotency.KeyHeader, name)
	}
	assert.EqualValues(t, 0, r.svc.execs.Load())
}

func TestStreamDuplicateWhileFirstRuns(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		e.svc.hold = make(chan struct{})
		e.svc.started = make(chan struct{}, 1)
		ctx := withKey(testCtx(t), "busy")
		done := make(chan streamAnswer, 1)
		go func() { done <- installments(t, ctx, e, installmentsReq) }()
		<-e.svc.started

		other := &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 10_000, Currency: "EUR", Count: 5}
		a := installments(t, ctx, e, other)
		assert.Equal(t, codes.FailedPrecondition, status.Code(a.err), "a different request is refused at once, not after the wait")

		// A client stream's requests are known only once read, so it
		// waits, then is checked against the outcome.
		ctx2 := withKey(testCtx(t), "busy-batch")
		batchDone := make(chan streamAnswer, 1)
		go func() { batchDone <- batch(t, ctx2, e, batchReqs) }()
		<-e.svc.started
		dups := make(chan streamAnswer, 2)
		go func() { dups <- batch(t, ctx2, e, batchReqs) }()
		go func() { dups <- batch(t, ctx2, e, batchReqs[:1]) }()

		close(e.svc.hold)
		first := <-done
		require.NoError(t, first.err)
		firstBatch := <-batchDone
		require.NoError(t, firstBatch.err)
		got := map[codes.Code]streamAnswer{}
		for range 2 {
			d := <-dups
			got[status.Code(d.err)] = d
		}
		require.Contains(t, got, codes.OK)
		assertReplayOf(t, firstBatch, got[codes.OK])
		assert.Contains(t, got, codes.FailedPrecondition)
		assert.EqualValues(t, 2, e.svc.execs.Load())
	})
}

func TestStreamRejectConcurrent(t *testing.T) {
	e := newEnv(t, memstore.New(), envConfig{server: []idempotency.Option{idempotency.WithRejectConcurrent()}})
	e.svc.hold = make(chan struct{})
	e.svc.started = make(chan struct{}, 1)
	ctx := withKey(testCtx(t), "busy")
	done := make(chan streamAnswer, 1)
	go func() { done <- interactive(t, ctx, e, batchReqs, false) }()
	<-e.svc.started
	a := interactive(t, ctx, e, batchReqs, false)
	assert.Equal(t, codes.Aborted, status.Code(a.err))
	close(e.svc.hold)
	require.NoError(t, (<-done).err)
	assert.EqualValues(t, 1, e.svc.execs.Load())
}
