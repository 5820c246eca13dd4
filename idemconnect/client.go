package idemconnect

import (
	"context"
	"errors"
	"io"
	"net/http"
	"sync"

	"connectrpc.com/connect"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
)

// KeyHeader is the HTTP header that carries the idempotency key: the
// metadata key idempotency.KeyHeader in its canonical HTTP form.
const KeyHeader = "Idempotency-Key"

// ReplayedHeader is the response header that marks a replayed answer.
const ReplayedHeader = "Idempotency-Replayed"

// IsReplayed reports whether a response's header marks it as a replay.
func IsReplayed(h http.Header) bool { return h.Get(ReplayedHeader) == "true" }

// NewClientInterceptor returns the client interceptor: it gives every call
// of a method that takes part an idempotency key, and keeps it for every
// retry, with the same rules and options as idempotency.UnaryClientInterceptor
// and idempotency.StreamClientInterceptor (opts are their CallOptions:
// WithMaxAttempts, WithBackoff, WithPerAttemptTimeout, WithRetryCodes,
// WithClientKeyField, WithoutKey). A key the caller set in the request's
// Idempotency-Key header is kept and sent on every attempt.
//
//	client := paymentsv1connect.NewPaymentServiceClient(http.DefaultClient, url,
//		connect.WithInterceptors(idemconnect.NewClientInterceptor(idempotency.WithMaxAttempts(4))))
//
// Unary calls are retried; a server-streaming call is retried while it has
// received nothing; client and bidirectional streams get a key and are not
// retried. Whether an answer was a replay: IsReplayed(resp.Header()).
//
// It panics if an option is out of its documented range, as the gRPC
// interceptors do. On a handler it does nothing.
func NewClientInterceptor(opts ...idempotency.CallOption) connect.Interceptor {
	return &clientInterceptor{
		unary:  idempotency.UnaryClientInterceptor(opts...),
		stream: idempotency.StreamClientInterceptor(opts...),
	}
}

type clientInterceptor struct {
	unary  grpc.UnaryClientInterceptor
	stream grpc.StreamClientInterceptor
}

func (c *clientInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// withCallerKey moves a key the caller put in the request header into the
// outgoing metadata, where the gRPC interceptors look for it.
func withCallerKey(ctx context.Context, h http.Header) context.Context {
	if vs := h.Values(KeyHeader); len(vs) > 0 {
		h.Del(KeyHeader)
		kv := make([]string, 0, 2*len(vs))
		for _, v := range vs {
			kv = append(kv, idempotency.KeyHeader, v)
		}
		ctx = metadata.AppendToOutgoingContext(ctx, kv...)
	}
	return ctx
}

// setKey puts the attempt's key, which the gRPC interceptor put in the
// outgoing metadata, on the request's header.
func setKey(ctx context.Context, h http.Header) {
	md, _ := metadata.FromOutgoingContext(ctx)
	if vs := md.Get(idempotency.KeyHeader); len(vs) > 0 {
		h[KeyHeader] = vs
	} else {
		h.Del(KeyHeader)
	}
}

// WrapUnary runs a unary call through the gRPC client interceptor, whose
// invoker is the connect call.
func (c *clientInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if !req.Spec().IsClient {
			return next(ctx, req)
		}
		ctx = withCallerKey(ctx, req.Header())
		var (
			resp     connect.AnyResponse
			last     error // the connect call's own error
			lastStat error // last as the interceptor saw it
		)
		invoker := func(actx context.Context, _ string, _, _ any, _ *grpc.ClientConn, _ ...grpc.CallOption) error {
			setKey(actx, req.Header())
			resp, last = next(actx, req)
			lastStat = statusError(last)
			return lastStat
		}
		err := c.unary(ctx, req.Spec().Procedure, req.Any(), nil, nil, invoker)
		switch {
		case err == nil:
			return resp, nil
		case err == lastStat:
			return resp, last
		}
		return nil, connectError(err, nil)
	}
}

// WrapStreamingClient runs a stream through the gRPC stream interceptor,
// whose streamer opens a connect stream (again, for a retry).
func (c *clientInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		sc := &streamConn{spec: spec, header: make(http.Header)}
		sc.open = func() (grpc.ClientStream, error) {
			desc := &grpc.StreamDesc{
				StreamName:    spec.Procedure,
				ClientStreams: spec.StreamType&connect.StreamTypeClient != 0,
				ServerStreams: spec.StreamType&connect.StreamTypeServer != 0,
			}
			streamer := func(sctx context.Context, _ *grpc.StreamDesc, _ *grpc.ClientConn, _ string, _ ...grpc.CallOption) (grpc.ClientStream, error) {
				conn := next(sctx, spec)
				for k, vs := range sc.header {
					conn.RequestHeader()[k] = append([]string(nil), vs...)
				}
				setKey(sctx, conn.RequestHeader())
				sc.mu.Lock()
				sc.conn = conn
				sc.mu.Unlock()
				return &clientStream{ctx: sctx, conn: conn}, nil
			}
			return c.stream(withCallerKey(ctx, sc.header), desc, nil, spec.Procedure, streamer)
		}
		return sc
	}
}

// streamConn is the connect stream the caller sees; the interceptor's
// stream is opened on first use, once the caller has set its headers.
type streamConn struct {
	spec   connect.Spec
	header http.Header // the caller's request header, copied to each attempt
	open   func() (grpc.ClientStream, error)

	once    sync.Once
	cs      grpc.ClientStream
	openErr error

	mu   sync.Mutex
	conn connect.StreamingClientConn // the attempt under way
}

func (s *streamConn) stream() (grpc.ClientStream, error) {
	s.once.Do(func() { s.cs, s.openErr = s.open() })
	return s.cs, s.openErr
}

func (s *streamConn) current() connect.StreamingClientConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn
}

func (s *streamConn) Spec() connect.Spec { return s.spec }

func (s *streamConn) Peer() connect.Peer {
	if c := s.current(); c != nil {
		return c.Peer()
	}
	return connect.Peer{}
}

func (s *streamConn) RequestHeader() http.Header {
	if c := s.current(); c != nil {
		return c.RequestHeader()
	}
	return s.header
}

func (s *streamConn) Send(m any) error {
	cs, err := s.stream()
	if err != nil {
		return s.clientErr(err)
	}
	return s.clientErr(cs.SendMsg(m))
}

func (s *streamConn) CloseRequest() error {
	cs, err := s.stream()
	if err != nil {
		return s.clientErr(err)
	}
	return s.clientErr(cs.CloseSend())
}

func (s *streamConn) Receive(m any) error {
	cs, err := s.stream()
	if err != nil {
		return s.clientErr(err)
	}
	return s.clientErr(cs.RecvMsg(m))
}

func (s *streamConn) ResponseHeader() http.Header {
	if c := s.current(); c != nil {
		return c.ResponseHeader()
	}
	return make(http.Header)
}

func (s *streamConn) ResponseTrailer() http.Header {
	if c := s.current(); c != nil {
		return c.ResponseTrailer()
	}
	return make(http.Header)
}

func (s *streamConn) CloseResponse() error {
	if c := s.current(); c != nil {
		return c.CloseResponse()
	}
	return nil
}

// clientErr returns err as the caller should see it: the connect stream's
// own error where it came from there, io.EOF as is.
func (s *streamConn) clientErr(err error) error {
	if err == nil || errors.Is(err, io.EOF) {
		return err
	}
	var w *wrapped
	if errors.As(err, &w) {
		return w.orig
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	return connectError(err, nil)
}

// wrapped is a connect stream's error as the gRPC interceptor sees it (a
// status, for its retry decisions), holding the original for the caller.
type wrapped struct {
	status error
	orig   error
}

func (w *wrapped) Error() string { return w.status.Error() }

// GRPCStatus lets status.FromError see the code.
func (w *wrapped) GRPCStatus() *status.Status { return status.Convert(w.status) }

// clientStream is the grpc.ClientStream the interceptor sees over one
// connect stream attempt.
type clientStream struct {
	ctx  context.Context
	conn connect.StreamingClientConn
}

func (c *clientStream) Header() (metadata.MD, error) {
	return mdFromHeader(c.conn.ResponseHeader()), nil
}
func (c *clientStream) Trailer() metadata.MD     { return mdFromHeader(c.conn.ResponseTrailer()) }
func (c *clientStream) CloseSend() error         { return c.wrap(c.conn.CloseRequest()) }
func (c *clientStream) Context() context.Context { return c.ctx }
func (c *clientStream) SendMsg(m any) error      { return c.wrap(c.conn.Send(m)) }

func (c *clientStream) RecvMsg(m any) error {
	err := c.conn.Receive(m)
	if errors.Is(err, io.EOF) {
		_ = c.conn.CloseResponse()
		return io.EOF
	}
	return c.wrap(err)
}

func (c *clientStream) wrap(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, io.EOF) {
		return io.EOF
	}
	return &wrapped{status: statusError(err), orig: err}
}
