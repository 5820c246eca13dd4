package app

import (
	"context"
	"errors"
	"io"
	"net/http"

	"connectrpc.com/connect"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"
	"github.com/grpcidem/idempotency/examples/proto/payments/v1/paymentsv1connect"
	"github.com/grpcidem/idempotency/idemconnect"
)

// NewConnectHandler serves the payments service over Connect, gRPC and
// gRPC-Web from one net/http handler, with the same idempotency Server as the
// gRPC server (so both share its store, and a retry may reach either), and
// this interceptor chain, outermost first: recovery (connect.WithRecover),
// the tenant stand-in (the X-Tenant header), idempotency, the handler.
//
//	curl -i -H 'Content-Type: application/json' -H 'Idempotency-Key: k1' \
//	  -d '{"account":"a","amountCents":100,"currency":"EUR"}' \
//	  http://127.0.0.1:8080/payments.v1.PaymentService/Charge
func NewConnectHandler(idem *idempotency.Server, svc paymentsv1.PaymentServiceServer, logger interface {
	Error(msg string, args ...any)
}) http.Handler {
	mux := http.NewServeMux()
	mux.Handle(paymentsv1connect.NewPaymentServiceHandler(connectPayments{svc},
		connect.WithRecover(func(_ context.Context, spec connect.Spec, _ http.Header, p any) error {
			logger.Error("panic in handler", "method", spec.Procedure, "panic", p)
			return connect.NewError(connect.CodeInternal, errors.New("internal error"))
		}),
		connect.WithInterceptors(tenantInterceptor{}, idemconnect.NewInterceptor(idem)),
	))
	return mux
}

// tenantInterceptor is tenantUnary and tenantStream for connect: it trusts
// the X-Tenant header, and puts the tenant where the scope function finds it.
type tenantInterceptor struct{}

func (tenantInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		ctx, err := withTenant(metadata.NewIncomingContext(ctx, metadata.MD{TenantHeader: req.Header().Values(TenantHeader)}))
		if err != nil {
			return nil, idemconnect.FromStatus(err)
		}
		return next(ctx, req)
	}
}

func (tenantInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (tenantInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		ctx, err := withTenant(metadata.NewIncomingContext(ctx, metadata.MD{TenantHeader: conn.RequestHeader().Values(TenantHeader)}))
		if err != nil {
			return idemconnect.FromStatus(err)
		}
		return next(ctx, conn)
	}
}

// connectPayments serves the gRPC service implementation as a connect
// handler: the example has one service, written once, behind both servers.
type connectPayments struct {
	svc paymentsv1.PaymentServiceServer
}

func (c connectPayments) Charge(ctx context.Context, req *connect.Request[paymentsv1.ChargeRequest]) (*connect.Response[paymentsv1.ChargeResponse], error) {
	resp, err := c.svc.Charge(ctx, req.Msg)
	if err != nil {
		return nil, idemconnect.FromStatus(err)
	}
	return connect.NewResponse(resp), nil
}

func (c connectPayments) GetCharge(ctx context.Context, req *connect.Request[paymentsv1.GetChargeRequest]) (*connect.Response[paymentsv1.ChargeResponse], error) {
	resp, err := c.svc.GetCharge(ctx, req.Msg)
	if err != nil {
		return nil, idemconnect.FromStatus(err)
	}
	return connect.NewResponse(resp), nil
}

func (c connectPayments) ChargeInstallments(ctx context.Context, req *connect.Request[paymentsv1.InstallmentsRequest], ss *connect.ServerStream[paymentsv1.ChargeResponse]) error {
	return idemconnect.FromStatus(c.svc.ChargeInstallments(req.Msg, &grpcServerStream[paymentsv1.ChargeRequest, paymentsv1.ChargeResponse]{ctx: ctx, send: ss.Send, header: ss.ResponseHeader(), trailer: ss.ResponseTrailer()}))
}

func (c connectPayments) ChargeBatch(ctx context.Context, cs *connect.ClientStream[paymentsv1.ChargeRequest]) (*connect.Response[paymentsv1.BatchResponse], error) {
	resp := connect.NewResponse(&paymentsv1.BatchResponse{})
	var closed *paymentsv1.BatchResponse
	s := &grpcServerStream[paymentsv1.ChargeRequest, paymentsv1.BatchResponse]{
		ctx: ctx, header: resp.Header(), trailer: resp.Trailer(),
		recv: func() (*paymentsv1.ChargeRequest, error) {
			if cs.Receive() {
				return cs.Msg(), nil
			}
			if err := cs.Err(); err != nil {
				return nil, err
			}
			return nil, errEOF
		},
		send: func(m *paymentsv1.BatchResponse) error { closed = m; return nil },
	}
	if err := c.svc.ChargeBatch(s); err != nil {
		return nil, idemconnect.FromStatus(err)
	}
	if closed == nil {
		return nil, connect.NewError(connect.CodeInternal, errors.New("the batch ended without an answer"))
	}
	resp.Msg = closed
	return resp, nil
}

func (c connectPayments) ChargeInteractive(ctx context.Context, bs *connect.BidiStream[paymentsv1.ChargeRequest, paymentsv1.ChargeResponse]) error {
	return idemconnect.FromStatus(c.svc.ChargeInteractive(&grpcServerStream[paymentsv1.ChargeRequest, paymentsv1.ChargeResponse]{
		ctx: ctx, header: bs.ResponseHeader(), trailer: bs.ResponseTrailer(),
		recv: bs.Receive, send: bs.Send,
	}))
}

// grpcServerStream is a connect stream as the grpc-go stream interfaces the
// service implements (ServerStreamingServer, ClientStreamingServer,
// BidiStreamingServer).
type grpcServerStream[Req, Res any] struct {
	ctx             context.Context
	recv            func() (*Req, error)
	send            func(*Res) error
	header, trailer http.Header
}

var errEOF = io.EOF

func (s *grpcServerStream[Req, Res]) Context() context.Context       { return s.ctx }
func (s *grpcServerStream[Req, Res]) Recv() (*Req, error)            { return s.recv() }
func (s *grpcServerStream[Req, Res]) Send(m *Res) error              { return s.send(m) }
func (s *grpcServerStream[Req, Res]) SendAndClose(m *Res) error      { return s.send(m) }
func (s *grpcServerStream[Req, Res]) SetHeader(md metadata.MD) error { addMD(s.header, md); return nil }
func (s *grpcServerStream[Req, Res]) SendHeader(md metadata.MD) error {
	addMD(s.header, md)
	return nil
}
func (s *grpcServerStream[Req, Res]) SetTrailer(md metadata.MD) { addMD(s.trailer, md) }
func (s *grpcServerStream[Req, Res]) SendMsg(m any) error {
	r, ok := m.(*Res)
	if !ok {
		return status.Errorf(codes.Internal, "unexpected response type %T", m)
	}
	return s.send(r)
}
func (s *grpcServerStream[Req, Res]) RecvMsg(m any) error {
	return status.Error(codes.Unimplemented, "RecvMsg is not served; use Recv")
}

func addMD(h http.Header, md metadata.MD) {
	for k, vs := range md {
		for _, v := range vs {
			h.Add(k, v)
		}
	}
}

var (
	_ grpc.ServerStreamingServer[paymentsv1.ChargeResponse]                          = (*grpcServerStream[paymentsv1.ChargeRequest, paymentsv1.ChargeResponse])(nil)
	_ grpc.ClientStreamingServer[paymentsv1.ChargeRequest, paymentsv1.BatchResponse] = (*grpcServerStream[paymentsv1.ChargeRequest, paymentsv1.BatchResponse])(nil)
	_ grpc.BidiStreamingServer[paymentsv1.ChargeRequest, paymentsv1.ChargeResponse]  = (*grpcServerStream[paymentsv1.ChargeRequest, paymentsv1.ChargeResponse])(nil)
)
