package app

import (
	"context"
	"crypto/subtle"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// adminConfig is the admin service's flags: off unless -admin is given.
type adminConfig struct {
	addr, token string
}

func adminFlags(fs *flag.FlagSet) *adminConfig {
	c := &adminConfig{}
	fs.StringVar(&c.addr, "admin", "", "serve the idempotency admin service (for `idempotency -addr ADDR`) on its own listener at `ADDR`, behind a bearer token; empty: off")
	fs.StringVar(&c.token, "admin-token", "", "the bearer `TOKEN` the admin service requires (default: $ADMIN_TOKEN)")
	return c
}

// startAdmin serves the admin service on store, if -admin asks for it, on
// a listener and gRPC server of its own, so that it can be kept off the
// public network, and behind a bearer token. It returns a function that
// stops it.
func startAdmin(cfg *adminConfig, store idempotency.Store, stdout io.Writer, logger *slog.Logger) (stop func(), err error) {
	if cfg.addr == "" {
		return func() {}, nil
	}
	token := cfg.token
	if token == "" {
		token = os.Getenv("ADMIN_TOKEN")
	}
	if token == "" {
		return nil, errors.New("-admin needs a token for its callers: set -admin-token TOKEN or $ADMIN_TOKEN")
	}
	svc, err := idempotency.NewAdminServer(store)
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return nil, fmt.Errorf("-admin %s: %w", cfg.addr, err)
	}
	auth := bearerAuth(token)
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if err := auth(ctx); err != nil {
			return nil, err
		}
		resp, err := handler(ctx, req)
		logger.Info("admin call", "method", info.FullMethod, "code", status.Code(err))
		return resp, err
	}), grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if err := auth(ss.Context()); err != nil {
			return err
		}
		return handler(srv, ss)
	}))
	idempotencyv1.RegisterAdminServer(srv, svc)
	go func() { _ = srv.Serve(lis) }()
	fmt.Fprintf(stdout, "admin service listening on %s\n", lis.Addr())
	return srv.Stop, nil
}

// bearerAuth checks that a call carries "authorization: Bearer TOKEN".
func bearerAuth(token string) func(ctx context.Context) error {
	want := []byte("Bearer " + token)
	return func(ctx context.Context) error {
		got := metadata.ValueFromIncomingContext(ctx, "authorization")
		if len(got) != 1 || subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got[0])), want) != 1 {
			return status.Error(codes.Unauthenticated, "the admin service needs the header authorization: Bearer TOKEN, with the server's -admin-token")
		}
		return nil
	}
}
