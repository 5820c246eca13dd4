package idempotency_test

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
)

// lingerer is a PaymentService whose streams outlive their caller's
// deadline, as a charge under way does: each sends part of its answer,
// waits until the test lets it go and the server has seen its caller go,
// then sends and sets the rest and returns OK. It keeps what it sent,
// marshalled, so that a replay is compared with everything the handler
// sent, not only with what its caller got.
type lingerer struct {
	testpb.UnimplementedPaymentServiceServer
	execs atomic.Int64
	// before is how many installments a server stream sends before it
	// waits; with 0, it sets its header after the wait too.
	before  int32
	held    chan struct{} // receives when the handler starts to wait
	release chan struct{} // closed by the test once the caller's deadline passed
	free    func()        // closes release, once

	mu   sync.Mutex
	sent [][]byte
}

func newLingerer(t testing.TB, before int32) *lingerer {
	l := &lingerer{before: before, held: make(chan struct{}, 1), release: make(chan struct{})}
	l.free = sync.OnceFunc(func() { close(l.release) })
	t.Cleanup(l.free)
	return l
}

func (l *lingerer) linger(ctx context.Context) {
	l.held <- struct{}{}
	<-l.release
	<-ctx.Done() // the server has seen the caller go, so what follows is after it
}

func (l *lingerer) send(ss grpc.ServerStream, m proto.Message) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.sent = append(l.sent, b)
	l.mu.Unlock()
	return ss.SendMsg(m)
}

func (l *lingerer) sentMsgs() [][]byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([][]byte(nil), l.sent...)
}

// The handlers fail on any error from a send or from setting metadata, so
// that a send that fails after the caller left fails the test.

func (l *lingerer) ChargeInstallments(req *testpb.InstallmentsRequest, ss grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
	l.execs.Add(1)
	ctx := ss.Context()
	if l.before == 0 {
		l.linger(ctx)
	}
	if err := ss.SetHeader(metadata.Pairs("x-plan", "lingering")); err != nil {
		return err
	}
	if err := grpc.SetHeader(ctx, metadata.Pairs("x-via", "context")); err != nil {
		return err
	}
	for i := range req.Count {
		if i > 0 && i == l.before {
			l.linger(ctx)
		}
		if err := l.send(ss, &testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account, AmountCents: int64(i), Currency: req.Currency}); err != nil {
			return err
		}
	}
	ss.SetTrailer(metadata.Pairs("x-count", "done"))
	return grpc.SetTrailer(ctx, metadata.Pairs("x-settled", "after the deadline"))
}

func (l *lingerer) ChargeBatch(ss grpc.ClientStreamingServer[testpb.ChargeRequest, testpb.BatchResponse]) error {
	l.execs.Add(1)
	out := &testpb.BatchResponse{}
	for {
		req, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		out.Charges = append(out.Charges, &testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency})
	}
	if err := ss.SendHeader(metadata.Pairs("x-batch", "lingering")); err != nil {
		return err
	}
	l.linger(ss.Context())
	if err := grpc.SetTrailer(ss.Context(), metadata.Pairs("x-settled", "after the deadline")); err != nil {
		return err
	}
	return l.send(ss, out)
}

// ChargeInteractive answers each request as it comes, then, after the wait,
// sends a settlement for each.
func (l *lingerer) ChargeInteractive(ss grpc.BidiStreamingServer[testpb.ChargeRequest, testpb.ChargeResponse]) error {
	l.execs.Add(1)
	var reqs []*testpb.ChargeRequest
	for {
		req, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		reqs = append(reqs, req)
		if err := l.send(ss, &testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}); err != nil {
			return err
		}
	}
	l.linger(ss.Context())
	for _, req := range reqs {
		if err := l.send(ss, &testpb.ChargeResponse{ChargeId: "settled-" + chargeID(), Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}); err != nil {
			return err
		}
	}
	ss.SetTrailer(metadata.Pairs("x-interactive", "settled"))
	return nil
}

// ready waits until e's connection is up, so that a call's short deadline is
// not spent dialling.
func ready(t testing.TB, e *env) {
	t.Helper()
	e.conn.Connect()
	for s := e.conn.GetState(); s != connectivity.Ready; s = e.conn.GetState() {
		require.True(t, e.conn.WaitForStateChange(testCtx(t), s), "connection not ready")
	}
}

// withDeadlines runs try with a caller deadline of 100 ms and, while try
// reports that the call did not get where the test needs it before the
// deadline passed (reserving a key can take that long on a loaded
// machine), again with a fresh server and a deadline four times longer, up
// to 6.4 s.
func withDeadlines(t *testing.T, try func(deadline time.Duration) bool) {
	t.Helper()
	for d := 100 * time.Millisecond; ; d *= 4 {
		if try(d) {
			return
		}
		if d >= 6400*time.Millisecond {
			t.Fatalf("the call never got going before its %v deadline", d)
		}
		t.Logf("the call did not get going before its %v deadline; again with a longer one", d)
	}
}

// heldOrDone waits, after the caller's deadline, until the handler waits
// (true) or the first execution ended without waiting (false). A call that
// never reached the handler (the server did not see it, or refused to
// reserve its key past its deadline) does neither; after a while that
// counts as false too, and is tried again with a longer deadline.
func heldOrDone(t testing.TB, l *lingerer, ev *events) bool {
	t.Helper()
	select {
	case <-l.held:
		return true
	case <-ev.executed:
		return false
	case <-time.After(5 * time.Second):
		return false
	}
}

// A stream handler that returns after its caller's deadline passed is
// recorded like a unary one: what it sent before the deadline and what it
// sent and set after, in order, with its status, header and trailer, so the
// caller's retry replays it and the handler runs once.
func TestStreamOutlivingItsDeadlineIsReplayed(t *testing.T) {
	type kind struct {
		name   string
		before int32 // server stream: installments sent before the deadline
		call   func(t testing.TB, ctx context.Context, e *env) streamAnswer
		// got reports whether the caller got, before its deadline, what the
		// handler sends before it waits.
		got                   func(a streamAnswer) bool
		wantHeader, wantTrail metadata.MD
	}
	req := &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 10_000, Currency: "EUR", Count: 4}
	kinds := []kind{{
		name:   "server stream",
		before: 2,
		call: func(t testing.TB, ctx context.Context, e *env) streamAnswer {
			return installments(t, ctx, e, req)
		},
		got:        func(a streamAnswer) bool { return len(a.msgs) == 2 },
		wantHeader: metadata.Pairs("x-plan", "lingering", "x-via", "context"),
		wantTrail:  metadata.Pairs("x-count", "done", "x-settled", "after the deadline"),
	}, {
		name:   "server stream sending nothing before",
		before: 0,
		call: func(t testing.TB, ctx context.Context, e *env) streamAnswer {
			return installments(t, ctx, e, req)
		},
		got:        func(streamAnswer) bool { return true },
		wantHeader: metadata.Pairs("x-plan", "lingering", "x-via", "context"),
		wantTrail:  metadata.Pairs("x-count", "done", "x-settled", "after the deadline"),
	}, {
		name: "client stream",
		call: func(t testing.TB, ctx context.Context, e *env) streamAnswer {
			return batch(t, ctx, e, batchReqs)
		},
		got:        func(a streamAnswer) bool { return len(a.header.Get("x-batch")) == 1 },
		wantHeader: metadata.Pairs("x-batch", "lingering"),
		wantTrail:  metadata.Pairs("x-settled", "after the deadline"),
	}, {
		name: "bidi",
		call: func(t testing.TB, ctx context.Context, e *env) streamAnswer {
			return interactive(t, ctx, e, batchReqs, false)
		},
		got:       func(a streamAnswer) bool { return len(a.msgs) == len(batchReqs) },
		wantTrail: metadata.Pairs("x-interactive", "settled"),
	}}
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		for _, k := range kinds {
			t.Run(k.name, func(t *testing.T) {
				var (
					l     *lingerer
					e     *env
					ev    *events
					first streamAnswer
				)
				withDeadlines(t, func(deadline time.Duration) bool {
					l, ev = newLingerer(t, k.before), newEvents()
					e = serve(t, newStore(t), l, []idempotency.Option{ev.option()})
					ready(t, e)
					ctx, cancel := context.WithTimeout(withKey(testCtx(t), "late"), deadline)
					defer cancel()
					first = k.call(t, ctx, e)
					if !heldOrDone(t, l, ev) || !k.got(first) {
						l.free()
						return false
					}
					return true
				})
				require.Equal(t, codes.DeadlineExceeded, status.Code(first.err), "%v", first.err)
				l.free()
				executed := ev.nextExecuted(t)
				require.Equal(t, codes.OK, executed.Code, "the handler's sends after its caller left did not fail it")
				require.True(t, executed.Stored, "the outcome of a handler that returned after its caller's deadline is stored")

				sent := l.sentMsgs()
				require.NotEmpty(t, sent)
				if len(first.msgs) > 0 {
					assert.Equal(t, sent[:len(first.msgs)], first.msgs, "the caller got the start of the outcome before its deadline")
				}

				again := k.call(t, withKey(testCtx(t), "late"), e)
				require.NoError(t, again.err)
				assert.True(t, idempotency.IsReplayed(again.header))
				assert.Equal(t, sent, again.msgs, "every message the handler sent, in order, byte for byte")
				sameMD(t, k.wantHeader, stripped(again.header), "header")
				sameMD(t, k.wantTrail, stripped(again.trailer), "trailer")
				assert.EqualValues(t, 1, l.execs.Load(), "the handler ran once")
			})
		}
	})
}

// careless is a PaymentService whose client and bidi streams take a failed
// receive for the end of the requests and answer OK with what they got, so
// that only the interceptor can tell that their requests were cut short.
type careless struct {
	testpb.UnimplementedPaymentServiceServer
	execs atomic.Int64
	read  atomic.Int64 // requests read, over every execution
}

func (c *careless) ChargeBatch(ss grpc.ClientStreamingServer[testpb.ChargeRequest, testpb.BatchResponse]) error {
	c.execs.Add(1)
	out := &testpb.BatchResponse{}
	for {
		req, err := ss.Recv()
		if err != nil {
			return ss.SendAndClose(out)
		}
		c.read.Add(1)
		out.Charges = append(out.Charges, &testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency})
	}
}

func (c *careless) ChargeInteractive(ss grpc.BidiStreamingServer[testpb.ChargeRequest, testpb.ChargeResponse]) error {
	c.execs.Add(1)
	for {
		req, err := ss.Recv()
		if err != nil {
			return nil
		}
		c.read.Add(1)
		if err := ss.Send(&testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}); err != nil {
			return err
		}
	}
}

// A client or bidi stream whose caller's deadline passed before it sent all
// its requests and closed is not stored, even though its handler returned
// OK after the caller left: its requests were cut short, so a retry with
// all of them runs the handler again.
func TestStreamCutShortByItsDeadlineIsNotStored(t *testing.T) {
	kinds := map[string]struct {
		// cutShort sends the first request only, and waits for the end of
		// the stream. It reports whether the handler read that request.
		cutShort func(t testing.TB, ctx context.Context, e *env, c *careless) (error, bool)
		retry    func(t testing.TB, ctx context.Context, e *env) streamAnswer
	}{
		"client stream": {
			cutShort: func(t testing.TB, ctx context.Context, e *env, c *careless) (error, bool) {
				stream, err := e.client.ChargeBatch(ctx)
				if err != nil {
					return err, false
				}
				if err := stream.Send(batchReqs[0]); err != nil {
					return err, false
				}
				// Reads the answer without closing the requests.
				err = stream.RecvMsg(new(testpb.BatchResponse))
				return err, c.read.Load() == 1
			},
			retry: func(t testing.TB, ctx context.Context, e *env) streamAnswer {
				return batch(t, ctx, e, batchReqs)
			},
		},
		"bidi": {
			cutShort: func(t testing.TB, ctx context.Context, e *env, c *careless) (error, bool) {
				stream, err := e.client.ChargeInteractive(ctx)
				if err != nil {
					return err, false
				}
				if err := stream.Send(batchReqs[0]); err != nil {
					return err, false
				}
				_, err = stream.Recv()
				got := err == nil
				for err == nil {
					_, err = stream.Recv()
				}
				return err, got
			},
			retry: func(t testing.TB, ctx context.Context, e *env) streamAnswer {
				return interactive(t, ctx, e, batchReqs, false)
			},
		},
	}
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		for name, k := range kinds {
			t.Run(name, func(t *testing.T) {
				var (
					c        *careless
					e        *env
					store    idempotency.Store
					ev       *events
					firstErr error
					executed idempotency.Event
				)
				withDeadlines(t, func(deadline time.Duration) bool {
					c, ev, store = &careless{}, newEvents(), newStore(t)
					e = serve(t, store, c, []idempotency.Option{ev.option()})
					ready(t, e)
					ctx, cancel := context.WithTimeout(withKey(testCtx(t), "short"), deadline)
					defer cancel()
					var got bool
					firstErr, got = k.cutShort(t, ctx, e, c)
					if !got {
						return false
					}
					executed = ev.nextExecuted(t)
					return true
				})
				require.Equal(t, codes.DeadlineExceeded, status.Code(firstErr), "%v", firstErr)
				assert.Equal(t, codes.OK, executed.Code, "the handler returned OK")
				assert.False(t, executed.Stored, "but its requests were cut short")
				assert.Equal(t, idempotency.Absent, lookup(t, store, "short"), "no partial record; the key is released")

				again := k.retry(t, withKey(testCtx(t), "short"), e)
				require.NoError(t, again.err)
				require.False(t, idempotency.IsReplayed(again.header), "the retry runs the handler again")
				assert.Len(t, again.ids, len(batchReqs), "over all its requests")
				assert.EqualValues(t, 2, c.execs.Load())
				assert.True(t, ev.nextExecuted(t).Stored, "a whole stream is stored")
			})
		}
	})
}
