package idempotency_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
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
)

// oddPayments is a PaymentService whose methods a test supplies, to play a
// handler that does unusual things with its metadata, status or response.
type oddPayments struct {
	testpb.UnimplementedPaymentServiceServer
	execs        atomic.Int64
	charge       func(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error)
	installments func(req *testpb.InstallmentsRequest, ss grpc.ServerStreamingServer[testpb.ChargeResponse]) error
}

func (p *oddPayments) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	p.execs.Add(1)
	return p.charge(ctx, req)
}

func (p *oddPayments) ChargeInstallments(req *testpb.InstallmentsRequest, ss grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
	p.execs.Add(1)
	return p.installments(req, ss)
}

func readInstallments(t testing.TB, ctx context.Context, e *env, req *testpb.InstallmentsRequest) streamAnswer {
	var a streamAnswer
	stream, err := e.client.ChargeInstallments(ctx, req)
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

// A handler that sets the idempotency-replayed header itself (passing on
// an upstream's answer, say) must not make a first execution look like a
// replay: the first execution never carries it, and a replay carries
// exactly one value, "true".
func TestFirstExecutionDropsHandlersReplayedHeader(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		svc := &oddPayments{
			charge: func(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
				_ = grpc.SetHeader(ctx, metadata.Pairs(idempotency.ReplayedHeader, "true", "x-a", "1"))
				_ = grpc.SetHeader(ctx, metadata.Pairs(idempotency.ReplayedHeader, "false"))
				return &testpb.ChargeResponse{ChargeId: chargeID()}, nil
			},
			installments: func(req *testpb.InstallmentsRequest, ss grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
				_ = ss.SetHeader(metadata.Pairs(idempotency.ReplayedHeader, "true", "x-a", "1"))
				_ = ss.SendHeader(metadata.Pairs(idempotency.ReplayedHeader, "false"))
				return ss.Send(&testpb.ChargeResponse{ChargeId: chargeID()})
			},
		}
		e := newEnv(t, newStore(t), envConfig{service: svc})
		ctx := withKey(testCtx(t), "replayed-by-handler")
		first := charge(ctx, e, chargeReq)
		require.NoError(t, first.err)
		assert.Empty(t, first.header.Get(idempotency.ReplayedHeader), "a unary first execution carries no replay header")
		assert.Equal(t, []string{"1"}, first.header.Get("x-a"))
		again := charge(ctx, e, chargeReq)
		require.NoError(t, again.err)
		assert.Equal(t, []string{"true"}, again.header.Get(idempotency.ReplayedHeader))
		assert.Equal(t, stripped(first.header), stripped(again.header))
		assert.Equal(t, first.resp.ChargeId, again.resp.ChargeId)

		sctx := withKey(testCtx(t), "replayed-by-stream-handler")
		sfirst := readInstallments(t, sctx, e, installmentsReq)
		require.NoError(t, sfirst.err)
		assert.Empty(t, sfirst.header.Get(idempotency.ReplayedHeader), "a stream's first execution carries no replay header")
		sagain := readInstallments(t, sctx, e, installmentsReq)
		require.NoError(t, sagain.err)
		assert.Equal(t, []string{"true"}, sagain.header.Get(idempotency.ReplayedHeader))
		assert.Equal(t, stripped(sfirst.header), stripped(sagain.header))
		assert.Equal(t, sfirst.msgs, sagain.msgs)
		assert.EqualValues(t, 2, svc.execs.Load())
	})
}

// Header set in pieces (SendHeader, then a SetHeader that fails), trailer
// set several times, binary values, repeated keys: a replay returns the
// same, for unary and server-streaming calls.
func TestMetadataSetInPiecesReplays(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		svc := &oddPayments{
			charge: func(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
				_ = grpc.SetHeader(ctx, metadata.Pairs("x-a", "1", "x-a", "2", "x-b-bin", "\x00\xff"))
				_ = grpc.SendHeader(ctx, metadata.Pairs("x-c", "3"))
				if err := grpc.SetHeader(ctx, metadata.Pairs("x-late", "no")); err == nil {
					return nil, errors.New("SetHeader after SendHeader succeeded")
				}
				_ = grpc.SetTrailer(ctx, metadata.Pairs("x-t", "1"))
				_ = grpc.SetTrailer(ctx, metadata.Pairs("x-t", "2", "x-u-bin", "\x01"))
				return nil, status.Error(codes.NotFound, "no such card")
			},
			installments: func(req *testpb.InstallmentsRequest, ss grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
				_ = ss.SetHeader(metadata.Pairs("x-a", "1"))
				_ = ss.Send(&testpb.ChargeResponse{ChargeId: chargeID()})
				if err := ss.SetHeader(metadata.Pairs("x-late", "no")); err == nil {
					return errors.New("SetHeader after Send succeeded")
				}
				ss.SetTrailer(metadata.Pairs("x-t", "1"))
				ss.SetTrailer(metadata.Pairs("x-t", "2"))
				return status.Error(codes.OutOfRange, "plan ended")
			},
		}
		e := newEnv(t, newStore(t), envConfig{service: svc})
		ctx := withKey(testCtx(t), "pieces")
		first := charge(ctx, e, chargeReq)
		require.Equal(t, codes.NotFound, status.Code(first.err), "%v", first.err)
		again := charge(ctx, e, chargeReq)
		assert.Equal(t, statusBytes(t, first.err), statusBytes(t, again.err))
		assert.Equal(t, stripped(first.header), stripped(again.header))
		assert.Equal(t, first.trailer, again.trailer)
		assert.Empty(t, first.header.Get("x-late"))

		sctx := withKey(testCtx(t), "pieces-stream")
		sfirst := readInstallments(t, sctx, e, installmentsReq)
		require.Equal(t, codes.OutOfRange, status.Code(sfirst.err), "%v", sfirst.err)
		sagain := readInstallments(t, sctx, e, installmentsReq)
		assert.Equal(t, statusBytes(t, sfirst.err), statusBytes(t, sagain.err))
		assert.Equal(t, stripped(sfirst.header), stripped(sagain.header))
		assert.Equal(t, sfirst.trailer, sagain.trailer)
		assert.Equal(t, sfirst.msgs, sagain.msgs)
		assert.EqualValues(t, 2, svc.execs.Load())
	})
}

// A handler that returns a typed nil response (what generated code makes
// of "return nil, nil") sends an empty message; its replay is the same.
func TestTypedNilResponseReplays(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		svc := &oddPayments{charge: func(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
			return nil, nil
		}}
		e := newEnv(t, newStore(t), envConfig{service: svc})
		ctx := withKey(testCtx(t), "typed-nil")
		first := charge(ctx, e, chargeReq)
		require.NoError(t, first.err)
		again := charge(ctx, e, chargeReq)
		require.NoError(t, again.err)
		assert.True(t, idempotency.IsReplayed(again.header))
		assert.Equal(t, mustMarshal(t, first.resp), mustMarshal(t, again.resp))
		assert.EqualValues(t, 1, svc.execs.Load())
	})
}

// A handler that returns its context's error (or one wrapping it): grpc-go
// sends Canceled or DeadlineExceeded, and that is the code recorded,
// reported and replayed, not Unknown. With the default cacheable set both
// release the key, but a server that caches DeadlineExceeded must replay
// what the first caller got.
func TestHandlerContextErrorKeepsItsWireCode(t *testing.T) {
	svc := &oddPayments{charge: func(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
		return nil, context.DeadlineExceeded
	}}
	var got atomic.Value
	e := newEnv(t, newMemstore(t), envConfig{service: svc, server: []idempotency.Option{
		idempotency.WithCacheableCodes(codes.OK, codes.DeadlineExceeded),
		idempotency.WithObserver(func(_ context.Context, ev idempotency.Event) {
			if ev.Kind == idempotency.EventExecuted {
				got.Store(ev.Code)
			}
		})}})
	ctx := withKey(testCtx(t), "ctx-err")
	first := charge(ctx, e, chargeReq)
	require.Equal(t, codes.DeadlineExceeded, status.Code(first.err), "grpc-go sends a context error's own code")
	assert.Equal(t, codes.DeadlineExceeded, got.Load(), "the executed event reports the code the caller got")
	again := charge(ctx, e, chargeReq)
	assert.True(t, idempotency.IsReplayed(again.header), "DeadlineExceeded is cacheable here, so it is replayed")
	assert.Equal(t, statusBytes(t, first.err), statusBytes(t, again.err))
	assert.EqualValues(t, 1, svc.execs.Load())
}

// A duplicate whose deadline is shorter than the running first execution
// gets Aborted or DeadlineExceeded in time, not a hang.
func TestDuplicateWithShortDeadlineWhileFirstRuns(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		hold := make(chan struct{})
		started := make(chan struct{}, 1)
		svc := &oddPayments{charge: func(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
			started <- struct{}{}
			<-hold
			return &testpb.ChargeResponse{ChargeId: chargeID()}, nil
		}}
		e := newEnv(t, newStore(t), envConfig{service: svc})
		ctx := withKey(testCtx(t), "slow")
		done := make(chan answer, 1)
		go func() { done <- charge(ctx, e, chargeReq) }()
		<-started
		dctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		t0 := time.Now()
		dup := charge(dctx, e, chargeReq)
		took := time.Since(t0)
		close(hold)
		assert.Contains(t, []codes.Code{codes.Aborted, codes.DeadlineExceeded}, status.Code(dup.err), "%v", dup.err)
		assert.Less(t, took, 2*time.Second)
		require.NoError(t, (<-done).err)
		again := charge(ctx, e, chargeReq)
		require.NoError(t, again.err)
		assert.True(t, idempotency.IsReplayed(again.header))
	})
}

// A nil request of a method with a key field (a typed nil, as a caller
// passes when every field is zero) cannot have its key field filled: the
// client interceptor sends the key as metadata instead, and never panics.
func TestClientNilRequestOfKeyFieldMethod(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), nil,
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor()),
		grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor()))
	ctx := testCtx(t)

	var req *testpb.TransferRequest
	var err error
	require.NotPanics(t, func() { _, err = e.client.Transfer(ctx, req) })
	require.NoError(t, err, "the key required by Transfer came as metadata")
	keys := e.keys.of(testpb.PolicyService_Transfer_FullMethodName)
	require.Len(t, keys, 1)
	assert.NoError(t, idempotency.ValidateKey(keys[0]))

	require.NotPanics(t, func() {
		var stream grpc.ServerStreamingClient[testpb.TransferResponse]
		stream, err = e.client.TransferSteps(ctx, req)
		if err == nil {
			_, err = stream.Recv()
		}
	})
	require.ErrorIs(t, err, io.EOF, "no steps for a zero count")
	keys = e.keys.of(testpb.PolicyService_TransferSteps_FullMethodName)
	require.Len(t, keys, 1)
	assert.NoError(t, idempotency.ValidateKey(keys[0]))
}

// A call given a key both in its outgoing metadata and with WithKey must
// not lose one of them silently: two different keys are refused before
// anything is sent, as a key field that differs from the key is.
func TestClientRefusesWithKeyThatDiffersFromMetadata(t *testing.T) {
	e := newPolicyEnv(t, newMemstore(t), nil,
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor()),
		grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor()))
	ctx := metadata.AppendToOutgoingContext(testCtx(t), idempotency.KeyHeader, "meta-key")

	_, err := e.pay.Charge(ctx, chargeReq, idempotency.WithKey("option-key"))
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	_, err = e.pay.ChargeBatch(ctx, idempotency.WithKey("option-key"))
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	assert.Empty(t, e.keys.of(testpb.PaymentService_Charge_FullMethodName), "nothing was sent")
	assert.Empty(t, e.keys.of(testpb.PaymentService_ChargeBatch_FullMethodName), "nothing was sent")

	_, err = e.pay.Charge(ctx, chargeReq, idempotency.WithKey("meta-key"))
	require.NoError(t, err, "the same key in both is one key")
	assert.Equal(t, []string{"meta-key"}, e.keys.of(testpb.PaymentService_Charge_FullMethodName))
}

// A client stream whose requests differ from the first execution's (here
// only in the last one) gets FailedPrecondition, and nothing of the stored
// outcome: not the replay header, not the first execution's header. Unary
// and server-streaming mismatches are the same.
func TestMismatchCarriesNoStoredHeader(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		e := newEnv(t, newStore(t), envConfig{})
		ctx := withKey(testCtx(t), "batch-mismatch")
		first := batch(t, ctx, e, batchReqs)
		require.NoError(t, first.err)
		require.Equal(t, []string{"1"}, first.header.Get("x-batch"))
		last := &testpb.ChargeRequest{Account: "acct_3", AmountCents: 301, Currency: "USD"}
		dup := batch(t, ctx, e, []*testpb.ChargeRequest{batchReqs[0], batchReqs[1], last})
		require.Equal(t, codes.FailedPrecondition, status.Code(dup.err), "%v", dup.err)
		assert.Empty(t, dup.header.Get(idempotency.ReplayedHeader), "a mismatch is not a replay")
		assert.Empty(t, dup.header.Get("x-batch"), "a mismatch gets nothing of the first execution's outcome")
		assert.Empty(t, stripped(dup.trailer))
		again := batch(t, ctx, e, batchReqs)
		require.NoError(t, again.err)
		assert.True(t, idempotency.IsReplayed(again.header))
		assert.Equal(t, first.msgs, again.msgs)

		uctx := withKey(testCtx(t), "charge-mismatch")
		require.NoError(t, charge(uctx, e, chargeReq).err)
		u := charge(uctx, e, &testpb.ChargeRequest{Account: "acct_1", AmountCents: 1251, Currency: "EUR"})
		require.Equal(t, codes.FailedPrecondition, status.Code(u.err), "%v", u.err)
		assert.Empty(t, stripped(u.header))
		assert.Empty(t, u.header.Get(idempotency.ReplayedHeader))

		sctx := withKey(testCtx(t), "installments-mismatch")
		require.NoError(t, installments(t, sctx, e, installmentsReq).err)
		s := installments(t, sctx, e, &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 10_000, Currency: "EUR", Count: 5})
		require.Equal(t, codes.FailedPrecondition, status.Code(s.err), "%v", s.err)
		assert.Empty(t, stripped(s.header))
		assert.Empty(t, s.header.Get(idempotency.ReplayedHeader))
		assert.EqualValues(t, 3, e.svc.execs.Load())
	})
}

// WithoutKey leaves a method declared NO_SIDE_EFFECTS or IDEMPOTENT
// retried, as its documentation says: the proto, not the key, makes those
// retries safe. A method that takes part is not retried without its key.
func TestClientWithoutKeyStillRetriesDeclaredSafeMethods(t *testing.T) {
	retry := []idempotency.CallOption{idempotency.WithMaxAttempts(3), idempotency.WithBackoff(time.Millisecond, time.Millisecond)}
	e := newPolicyEnv(t, newMemstore(t), nil,
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor(retry...)),
		grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor(retry...)))
	ctx := testCtx(t)

	e.svc.failFirst.Store(1)
	var attempts int
	require.NoError(t, call(ctx, e.client.Inspect, &testpb.TransferRequest{}, idempotency.WithoutKey(), idempotency.Attempts(&attempts)).err)
	assert.Equal(t, 2, attempts)
	assert.Equal(t, []string{"", ""}, e.keys.of(testpb.PolicyService_Inspect_FullMethodName))

	e.svc.failFirst.Store(1)
	a := call(ctx, e.client.Refund, &testpb.TransferRequest{}, idempotency.WithoutKey(), idempotency.Attempts(&attempts))
	require.Equal(t, codes.Unavailable, status.Code(a.err), "a method that takes part is not retried without a key")
	assert.Equal(t, 1, attempts)
}

// A key sent as binary metadata (idempotency-key-bin, as a client with a
// raw 16-byte key might) is not the key: it must be refused with
// InvalidArgument naming the header, not ignored, which would run every
// retry of a payment again. The client interceptor refuses it before
// sending.
func TestBinaryKeyHeaderIsRefused(t *testing.T) {
	e := newEnv(t, newMemstore(t), envConfig{})
	binKey := idempotency.KeyHeader + "-bin"
	ctx := metadata.NewOutgoingContext(testCtx(t), metadata.Pairs(binKey, "\x01\x02\x03"))
	for range 2 {
		a := charge(ctx, e, chargeReq)
		require.Equal(t, codes.InvalidArgument, status.Code(a.err), "%v", a.err)
		assert.Contains(t, status.Convert(a.err).Message(), binKey)
	}
	assert.Zero(t, e.svc.execs.Load(), "the handler did not run")
	// Beside the text key it changes nothing: the text key is the key.
	ctx = metadata.NewOutgoingContext(testCtx(t), metadata.Pairs(binKey, "\x01", idempotency.KeyHeader, "order-1"))
	require.NoError(t, charge(ctx, e, chargeReq).err)
	assert.True(t, idempotency.IsReplayed(charge(ctx, e, chargeReq).header))
	assert.EqualValues(t, 1, e.svc.execs.Load())

	c := newEnv(t, newMemstore(t), envConfig{client: []grpc.DialOption{grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor())}})
	_, err := c.client.Charge(metadata.AppendToOutgoingContext(testCtx(t), binKey, "\x01"), chargeReq)
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	assert.Contains(t, status.Convert(err).Message(), binKey)
	assert.Zero(t, c.svc.execs.Load(), "nothing was sent")
}

// A stream message that grpc-go cannot encode (a string field that is not
// valid UTF-8, passed on from a legacy system) fails the send and ends the
// stream while its client is still there. The handler must get that error,
// as it would without the interceptor, and the outcome is not stored: the
// send failed, the client did not go away.
func TestStreamSendThatCannotBeEncodedFailsTheHandler(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		var sendErr atomic.Value
		svc := &oddPayments{installments: func(req *testpb.InstallmentsRequest, ss grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
			if err := ss.Send(&testpb.ChargeResponse{ChargeId: chargeID()}); err != nil {
				return err
			}
			err := ss.Send(&testpb.ChargeResponse{ChargeId: chargeID(), Account: "caf\xe9"})
			sendErr.Store(fmt.Sprint(err))
			return err
		}}
		store := newStore(t)
		executed := make(chan idempotency.Event, 1)
		e := newEnv(t, store, envConfig{service: svc, server: []idempotency.Option{idempotency.WithObserver(func(_ context.Context, ev idempotency.Event) {
			if ev.Kind == idempotency.EventExecuted {
				executed <- ev
			}
		})}})
		ctx := withKey(testCtx(t), "unencodable")
		first := readInstallments(t, ctx, e, installmentsReq)
		require.Equal(t, codes.Internal, status.Code(first.err), "%v", first.err)
		// grpc-go ended the stream when the send failed: the handler may
		// still be returning.
		ev := <-executed
		assert.False(t, ev.Stored)
		assert.Contains(t, sendErr.Load(), "marshal", "the handler got the failed send's error")
		entry, err := store.Lookup(testCtx(t), idempotency.StoreKey("", "unencodable"))
		require.NoError(t, err)
		assert.Equal(t, idempotency.Absent, entry.State, "a stream whose send failed stores nothing and releases its key")
	})
}

// A unary method that is not in the protobuf registry (a hand-written
// ServiceDesc, as proxies and some code generators make) takes part like
// any other: its first execution is stored, so its replay must return the
// stored response, not Internal for the whole retention.
func TestUnregisteredUnaryMethodReplays(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		const method = "/probe.v1.Custom/Pay"
		var execs atomic.Int64
		desc := grpc.ServiceDesc{
			ServiceName: "probe.v1.Custom",
			HandlerType: (*any)(nil),
			Methods: []grpc.MethodDesc{{MethodName: "Pay", Handler: func(_ any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
				in := new(testpb.ChargeRequest)
				if err := dec(in); err != nil {
					return nil, err
				}
				return ic(ctx, in, &grpc.UnaryServerInfo{FullMethod: method}, func(ctx context.Context, req any) (any, error) {
					execs.Add(1)
					_ = grpc.SetHeader(ctx, metadata.Pairs("x-charge", "1"))
					r := req.(*testpb.ChargeRequest)
					return &testpb.ChargeResponse{ChargeId: chargeID(), Account: r.Account, AmountCents: r.AmountCents}, nil
				})
			}}},
		}
		srv := grpc.NewServer(mustServer(newStore(t)).ServerOptions()...)
		srv.RegisterService(&desc, struct{}{})
		lis := bufconn.Listen(1 << 20)
		go func() { _ = srv.Serve(lis) }()
		t.Cleanup(srv.Stop)
		conn, err := grpc.NewClient("passthrough:///bufnet",
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
			grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close() })

		ctx := withKey(testCtx(t), "custom-1")
		var firstHeader, againHeader metadata.MD
		first, again := new(testpb.ChargeResponse), new(testpb.ChargeResponse)
		require.NoError(t, conn.Invoke(ctx, method, chargeReq, first, grpc.Header(&firstHeader)))
		require.NoError(t, conn.Invoke(ctx, method, chargeReq, again, grpc.Header(&againHeader)))
		assert.True(t, idempotency.IsReplayed(againHeader))
		assert.Equal(t, mustMarshal(t, first), mustMarshal(t, again))
		assert.Equal(t, stripped(firstHeader), stripped(againHeader))
		assert.EqualValues(t, 1, execs.Load())
	})
}

// okStatusError is an error whose gRPC status says OK: grpc-go sends the OK
// status without a response, and the unary caller gets Internal.
type okStatusError struct{}

func (okStatusError) Error() string              { return "done, sort of" }
func (okStatusError) GRPCStatus() *status.Status { return status.New(codes.OK, "done, sort of") }

// A unary handler that returns an error whose status is OK gives its caller
// no response. That outcome is not stored as an OK one with no response,
// which every duplicate would get as Internal for the whole retention: the
// key is released, so a retry runs again.
func TestUnaryErrorWithStatusOKIsNotStored(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(testing.TB) idempotency.Store) {
		var fail atomic.Bool
		fail.Store(true)
		svc := &oddPayments{charge: func(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
			if fail.CompareAndSwap(true, false) {
				return nil, okStatusError{}
			}
			return &testpb.ChargeResponse{ChargeId: chargeID()}, nil
		}}
		executed := make(chan idempotency.Event, 2)
		e := newEnv(t, newStore(t), envConfig{service: svc, server: []idempotency.Option{idempotency.WithObserver(func(_ context.Context, ev idempotency.Event) {
			if ev.Kind == idempotency.EventExecuted {
				executed <- ev
			}
		})}})
		ctx := withKey(testCtx(t), "ok-error")
		first := charge(ctx, e, chargeReq)
		require.Equal(t, codes.Internal, status.Code(first.err), "%v", first.err)
		ev := <-executed
		assert.False(t, ev.Stored)
		assert.Equal(t, codes.Internal, ev.Code)
		again := charge(ctx, e, chargeReq)
		require.NoError(t, again.err)
		assert.False(t, idempotency.IsReplayed(again.header))
		assert.EqualValues(t, 2, svc.execs.Load())
	})
}
