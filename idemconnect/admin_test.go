package idemconnect_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/idemconnect"
	"github.com/grpcidem/idempotency/internal/admintest"
	"github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/internal/testpb/testpbconnect"
	"github.com/grpcidem/idempotency/memstore"
)

// serveH2C serves h on a loopback port over HTTP/1.1 and unencrypted HTTP/2,
// as a connect-only server does, and returns its address.
func serveH2C(t *testing.T, h http.Handler) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	hs := &http.Server{Handler: h, Protocols: &p}
	go func() { _ = hs.Serve(lis) }()
	t.Cleanup(func() { _ = hs.Close() })
	return lis.Addr().String()
}

// bearer is a connect interceptor that wants admintest.Token.
type bearer struct{}

func (bearer) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if req.Header().Get("Authorization") != "Bearer "+admintest.Token {
			return nil, connect.NewError(connect.CodeUnauthenticated, errors.New("a bearer token is required"))
		}
		return next(ctx, req)
	}
}
func (bearer) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}
func (bearer) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// TestAdminHandlerWithTheCLI: a connect-only server serves the admin service
// with NewAdminHandler; the operator's CLI, a real process speaking gRPC,
// forgets a key through it, and the next call with the key runs again.
func TestAdminHandlerWithTheCLI(t *testing.T) {
	store := memstore.New()
	t.Cleanup(func() { _ = store.Close() })
	l := newLedger()
	hs := serveConnect(t, newServer(t, store), l, nil)
	client := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL)
	charge := func() *connect.Response[testpb.ChargeResponse] {
		req := connect.NewRequest(&testpb.ChargeRequest{Account: "a", AmountCents: 100})
		req.Header().Set(idemconnect.KeyHeader, "order-1")
		resp, err := client.Charge(context.Background(), req)
		require.NoError(t, err)
		return resp
	}

	mux := http.NewServeMux()
	path, h, err := idemconnect.NewAdminHandler(store, connect.WithInterceptors(bearer{}))
	require.NoError(t, err)
	mux.Handle(path, h)
	adminAddr := serveH2C(t, mux)

	charge()
	assert.True(t, idemconnect.IsReplayed(charge().Header()))
	assert.Equal(t, 1, l.count("order-1"))

	cli := admintest.BuildCLI(t)
	run := func(token string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, cli, args...)
		cmd.Env = append(cmd.Environ(), "IDEMPOTENCY_ADMIN_TOKEN="+token)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run("wrong", "forget", "-addr", adminAddr, "order-1")
	assert.Error(t, err)
	assert.Contains(t, out, "Unauthenticated")
	out, err = run(admintest.Token, "list", "-addr", adminAddr)
	require.NoError(t, err, out)
	assert.Contains(t, out, "order-1")
	out, err = run(admintest.Token, "forget", "-addr", adminAddr, "order-1")
	require.NoError(t, err, out)
	assert.True(t, strings.Contains(out, "runs the handler again"), out)

	assert.False(t, idemconnect.IsReplayed(charge().Header()), "the forgotten key runs again")
	assert.Equal(t, 2, l.count("order-1"))

	// A store that cannot list its keys has no admin service.
	_, _, err = idemconnect.NewAdminHandler(struct{ idempotency.Store }{store})
	assert.Error(t, err)
}
