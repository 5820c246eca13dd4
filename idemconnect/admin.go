package idemconnect

import (
	"context"
	"net/http"

	"connectrpc.com/connect"

	"github.com/grpcidem/idempotency"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
	"github.com/grpcidem/idempotency/proto/idempotency/v1/idempotencyv1connect"
)

// NewAdminHandler serves the admin service of idempotency.NewAdminServer
// (idempotency.v1.Admin) as a connect handler, for servers that run connect
// alone: it speaks the Connect, gRPC and gRPC-Web protocols, so the
// operator's CLI (cmd/idempotency -addr, which speaks gRPC) and curl reach
// it alike. Mount it on a listener of its own behind authentication (opts
// can carry the interceptor that checks it):
//
//	path, h, err := idemconnect.NewAdminHandler(store, connect.WithInterceptors(auth))
//	mux.Handle(path, h)
//
// It returns the error of NewAdminServer for a store that cannot be
// inspected.
func NewAdminHandler(store idempotency.Store, opts ...connect.HandlerOption) (string, http.Handler, error) {
	svc, err := idempotency.NewAdminServer(store)
	if err != nil {
		return "", nil, err
	}
	path, h := idempotencyv1connect.NewAdminHandler(adminHandler{svc}, opts...)
	return path, h, nil
}

// adminHandler translates between connect and the gRPC implementation.
type adminHandler struct{ svc idempotencyv1.AdminServer }

// adminCall runs one method of the gRPC implementation for a connect call.
func adminCall[Req, Res any](ctx context.Context, req *connect.Request[Req], f func(context.Context, *Req) (*Res, error)) (*connect.Response[Res], error) {
	res, err := f(ctx, req.Msg)
	if err != nil {
		return nil, connectError(err, nil)
	}
	return connect.NewResponse(res), nil
}

func (a adminHandler) ListRecords(ctx context.Context, req *connect.Request[idempotencyv1.ListRecordsRequest]) (*connect.Response[idempotencyv1.ListRecordsResponse], error) {
	return adminCall(ctx, req, a.svc.ListRecords)
}

func (a adminHandler) GetRecord(ctx context.Context, req *connect.Request[idempotencyv1.GetRecordRequest]) (*connect.Response[idempotencyv1.GetRecordResponse], error) {
	return adminCall(ctx, req, a.svc.GetRecord)
}

func (a adminHandler) ForgetRecord(ctx context.Context, req *connect.Request[idempotencyv1.ForgetRecordRequest]) (*connect.Response[idempotencyv1.ForgetRecordResponse], error) {
	return adminCall(ctx, req, a.svc.ForgetRecord)
}

func (a adminHandler) Stats(ctx context.Context, req *connect.Request[idempotencyv1.StatsRequest]) (*connect.Response[idempotencyv1.StatsResponse], error) {
	return adminCall(ctx, req, a.svc.Stats)
}
