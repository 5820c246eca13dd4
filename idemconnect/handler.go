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
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency"
)

// NewInterceptor returns the handler interceptor that runs srv's engine for
// connect handlers. Give it to every handler of a service, among its
// options:
//
//	path, handler := paymentsv1connect.NewPaymentServiceHandler(svc,
//		connect.WithInterceptors(idemconnect.NewInterceptor(srv)))
//
// Every protocol connect serves (Connect, gRPC, gRPC-Web) goes through the
// same decisions as srv's gRPC interceptors: the key from the
// Idempotency-Key header (or the request's key field), the scope, the
// method's policy, the store, the record format and the observer are srv's.
// Its client side does nothing: use NewClientInterceptor for clients.
func NewInterceptor(srv *idempotency.Server) connect.Interceptor {
	return &handlerInterceptor{
		unary:  srv.UnaryServerInterceptor(),
		stream: srv.StreamServerInterceptor(),
	}
}

type handlerInterceptor struct {
	unary  grpc.UnaryServerInterceptor
	stream grpc.StreamServerInterceptor
}

func (h *handlerInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

// WrapUnary hands a unary call to the engine, with the request's headers as
// its incoming metadata; the handler's response, headers, trailers and
// error are recorded as a grpc-go handler's would be, and a replay is turned
// back into a connect response.
func (h *handlerInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if req.Spec().IsClient {
			return next(ctx, req)
		}
		info, _ := connect.CallInfoForHandlerContext(ctx)
		t := &unaryTransport{method: req.Spec().Procedure}
		ctx = metadata.NewIncomingContext(ctx, mdFromHeader(req.Header()))
		ctx = grpc.NewContextWithServerTransportStream(ctx, t)

		var (
			first   connect.AnyResponse // the handler's own response
			herr    error               // and error, as it returned them
			statErr error               // herr as the engine saw it
		)
		handler := func(hctx context.Context, _ any) (any, error) {
			var before http.Header
			if info != nil {
				before = info.ResponseHeader().Clone()
			}
			t.ran = true
			first, herr = next(hctx, req)
			// A first execution never carries the replay header, even
			// one its handler set: it goes out with the handler's own
			// headers, which the engine's recorder does not see.
			if info != nil {
				info.ResponseHeader().Del(ReplayedHeader)
			}
			if first != nil {
				first.Header().Del(ReplayedHeader)
			}
			// Tell the engine what the handler set, for the record: its
			// response's headers and trailers, what it set through its
			// call info, and an error's metadata. They already travel with
			// the response, so the transport only records them.
			var header, trailer http.Header
			if info != nil {
				header = addedHeaders(before, info.ResponseHeader())
				trailer = info.ResponseTrailer()
			}
			if first != nil {
				header = merge(header, first.Header())
				trailer = merge(trailer, first.Trailer())
			}
			var ce *connect.Error
			if errors.As(herr, &ce) {
				trailer = merge(trailer, ce.Meta())
			}
			t.setRecordOnly(true)
			if len(header) > 0 {
				_ = grpc.SetHeader(hctx, mdFromHeader(header))
			}
			if len(trailer) > 0 {
				_ = grpc.SetTrailer(hctx, mdFromHeader(trailer))
			}
			t.setRecordOnly(false)
			if herr != nil {
				statErr = statusError(herr)
				return nil, statErr
			}
			if first == nil {
				return nil, nil
			}
			return first.Any(), nil
		}
		resp, err := h.unary(ctx, req.Any(), &grpc.UnaryServerInfo{FullMethod: req.Spec().Procedure}, handler)
		if t.ran {
			// The first execution: its own response and error, as they
			// were, unless the engine replaced its outcome; with what the
			// handler set through grpc.SetHeader and grpc.SetTrailer, if
			// it used them (a gRPC service served as a connect handler).
			header, trailer := t.taken()
			if err == nil {
				addHeader(first.Header(), header)
				addHeader(first.Trailer(), trailer)
				return first, nil
			}
			if info != nil {
				addHeader(info.ResponseHeader(), header)
			}
			if err == statErr {
				var ce *connect.Error
				if len(trailer) == 0 {
					return nil, herr
				} else if errors.As(herr, &ce) {
					addHeader(ce.Meta(), trailer)
					return nil, herr
				}
			}
			return nil, connectError(err, trailer)
		}
		// A replay, a refusal, or a call the engine did not keep.
		header, trailer := t.taken()
		if err != nil {
			if info != nil {
				addHeader(info.ResponseHeader(), header)
			}
			return nil, connectError(err, trailer)
		}
		m, ok := resp.(proto.Message)
		if !ok {
			return nil, connect.NewError(connect.CodeInternal, errors.New("idempotency: the replayed response is not a protobuf message"))
		}
		out := connect.NewResponse(&replayed{m})
		addHeader(out.Header(), header)
		addHeader(out.Trailer(), trailer)
		return out, nil
	}
}

// replayed is a stored response message of the handler's response type:
// connect's codecs marshal it through its ProtoReflect method.
type replayed struct{ proto.Message }

// unaryTransport is the grpc.ServerTransportStream the engine sees for a
// unary connect call. What is set through it (a replay's header and trailer
// from the engine, or what a handler sets with grpc.SetHeader and
// grpc.SetTrailer) is kept for the connect response; what the adapter hands
// the engine for the record (recordOnly) already travels with the handler's
// own response.
type unaryTransport struct {
	method string
	ran    bool // the handler ran: a first execution (or fail-open)

	mu              sync.Mutex
	recordOnly      bool
	header, trailer metadata.MD
}

func (t *unaryTransport) setRecordOnly(on bool) {
	t.mu.Lock()
	t.recordOnly = on
	t.mu.Unlock()
}

// taken returns what was set to be sent.
func (t *unaryTransport) taken() (header, trailer metadata.MD) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.header, t.trailer
}

func (t *unaryTransport) Method() string { return t.method }

func (t *unaryTransport) SetHeader(md metadata.MD) error {
	t.mu.Lock()
	if !t.recordOnly {
		t.header = metadata.Join(t.header, md)
	}
	t.mu.Unlock()
	return nil
}

func (t *unaryTransport) SendHeader(md metadata.MD) error { return t.SetHeader(md) }

func (t *unaryTransport) SetTrailer(md metadata.MD) error {
	t.mu.Lock()
	if !t.recordOnly {
		t.trailer = metadata.Join(t.trailer, md)
	}
	t.mu.Unlock()
	return nil
}

// WrapStreamingHandler hands a streaming call to the engine through a
// grpc.ServerStream over the connect stream; the handler sees a connect
// stream over the engine's recording stream.
func (h *handlerInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		spec := conn.Spec()
		ss := &serverStream{ctx: metadata.NewIncomingContext(ctx, mdFromHeader(conn.RequestHeader())), conn: conn}
		info := &grpc.StreamServerInfo{
			FullMethod:     spec.Procedure,
			IsClientStream: spec.StreamType&connect.StreamTypeClient != 0,
			IsServerStream: spec.StreamType&connect.StreamTypeServer != 0,
		}
		var herr, statErr error
		err := h.stream(nil, ss, info, func(_ any, es grpc.ServerStream) error {
			hc := &handlerConn{StreamingHandlerConn: conn, es: es, header: make(http.Header), trailer: make(http.Header)}
			herr = next(es.Context(), hc)
			var ce *connect.Error
			if errors.As(herr, &ce) {
				hc.trailer = merge(hc.trailer, ce.Meta())
			}
			hc.flush()
			if herr != nil {
				statErr = statusError(herr)
				return statErr
			}
			return nil
		})
		switch {
		case err == nil:
			return nil
		case err == statErr:
			return herr
		}
		return connectError(err, nil)
	}
}

// serverStream is the grpc.ServerStream the engine sees for a connect
// stream: metadata it sets goes to the connect response's headers and
// trailers.
type serverStream struct {
	ctx  context.Context
	conn connect.StreamingHandlerConn
}

func (s *serverStream) Context() context.Context { return s.ctx }

func (s *serverStream) SetHeader(md metadata.MD) error {
	addHeader(s.conn.ResponseHeader(), md)
	return nil
}

func (s *serverStream) SendHeader(md metadata.MD) error { return s.SetHeader(md) }

func (s *serverStream) SetTrailer(md metadata.MD) {
	addHeader(s.conn.ResponseTrailer(), md)
}

func (s *serverStream) SendMsg(m any) error { return s.conn.Send(m) }

func (s *serverStream) RecvMsg(m any) error {
	err := s.conn.Receive(m)
	if errors.Is(err, io.EOF) {
		return io.EOF
	}
	return err
}

// handlerConn is the connect stream a first execution's handler sees: its
// messages go through the engine's recording stream, and the headers and
// trailers it sets are handed to the engine before its first send and when
// it returns.
type handlerConn struct {
	connect.StreamingHandlerConn
	es              grpc.ServerStream
	header, trailer http.Header
	sent            bool
}

func (c *handlerConn) Receive(m any) error { return c.es.RecvMsg(m) }

func (c *handlerConn) Send(m any) error {
	if !c.sent {
		c.sent = true
		if len(c.header) > 0 {
			if err := c.es.SetHeader(mdFromHeader(c.header)); err != nil {
				return err
			}
		}
	}
	return c.es.SendMsg(m)
}

func (c *handlerConn) ResponseHeader() http.Header  { return c.header }
func (c *handlerConn) ResponseTrailer() http.Header { return c.trailer }

// flush hands the engine what the handler set and has not been sent.
func (c *handlerConn) flush() {
	if !c.sent && len(c.header) > 0 {
		_ = c.es.SetHeader(mdFromHeader(c.header))
	}
	if len(c.trailer) > 0 {
		c.es.SetTrailer(mdFromHeader(c.trailer))
	}
}
