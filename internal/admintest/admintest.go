// Package admintest checks the admin service end to end for the stores'
// tests: a real gRPC server on loopback TCP with the interceptors, the admin
// service on a listener of its own behind a bearer-token check, and the
// idempotency command run as a real process against it.
package admintest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"net"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/internal/testpb"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// Token is the bearer token the admin listener accepts.
const Token = "admintest-secret"

// counter is a PaymentService whose Charge counts its executions per
// account; the account "hold" blocks until release is closed.
type counter struct {
	testpb.UnimplementedPaymentServiceServer
	mu      sync.Mutex
	execs   map[string]int
	started chan string
	release chan struct{}
}

func (c *counter) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	c.mu.Lock()
	c.execs[req.Account]++
	c.mu.Unlock()
	c.started <- req.Account
	if req.Account == "hold" {
		select {
		case <-c.release:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	return &testpb.ChargeResponse{ChargeId: "ch", Account: req.Account, AmountCents: req.AmountCents}, nil
}

func (c *counter) count(account string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.execs[account]
}

// requireToken is the admin listener's authentication: the shape of what
// docs/admin.md shows.
func requireToken(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if got := metadata.ValueFromIncomingContext(ctx, "authorization"); len(got) != 1 || got[0] != "Bearer "+Token {
		return nil, status.Error(codes.Unauthenticated, "the admin service needs authorization: Bearer TOKEN")
	}
	return handler(ctx, req)
}

// BuildCLI builds the idempotency command into a temporary directory of
// t's and returns its path.
func BuildCLI(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "idempotency")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/grpcidem/idempotency/cmd/idempotency").CombinedOutput()
	if err != nil {
		t.Fatalf("go build ./cmd/idempotency: %v\n%s", err, out)
	}
	return bin
}

// CheckForget runs the scenario of the admin service on store (which must
// implement idempotency.Inspector): a call with a key runs once and is then
// replayed; the command's forget through the admin service makes the next
// call with the key run again; a running key is refused without -force, and
// forgotten with it. The store is the caller's to close.
func CheckForget(t *testing.T, store idempotency.Store) {
	t.Helper()
	cli := BuildCLI(t)
	const scope = "tenant/a"
	srv, err := idempotency.NewServer(store, idempotency.WithScope(func(context.Context) (string, error) { return scope, nil }))
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	svc := &counter{execs: map[string]int{}, started: make(chan string, 64), release: make(chan struct{})}
	app := grpc.NewServer(grpc.ChainUnaryInterceptor(srv.UnaryServerInterceptor()), grpc.ChainStreamInterceptor(srv.StreamServerInterceptor()))
	testpb.RegisterPaymentServiceServer(app, svc)
	adminSvc, err := idempotency.NewAdminServer(store)
	if err != nil {
		t.Fatalf("NewAdminServer: %v", err)
	}
	admin := grpc.NewServer(grpc.ChainUnaryInterceptor(requireToken))
	idempotencyv1.RegisterAdminServer(admin, adminSvc)
	appAddr, adminAddr := serve(t, app), serve(t, admin)
	t.Cleanup(func() {
		select {
		case <-svc.release:
		default:
			close(svc.release)
		}
		app.Stop()
		admin.Stop()
	})

	conn, err := grpc.NewClient(appAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	client := testpb.NewPaymentServiceClient(conn)
	charge := func(ctx context.Context, key, account string) error {
		ctx = metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, key)
		_, err := client.Charge(ctx, &testpb.ChargeRequest{Account: account, AmountCents: 100})
		return err
	}
	run := func(env []string, args ...string) (int, string, string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, cli, args...)
		cmd.Env = append(os.Environ(), env...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		code := 0
		if err != nil {
			ee, ok := err.(*exec.ExitError)
			if !ok {
				t.Fatalf("run %s: %v", strings.Join(args, " "), err)
			}
			code = ee.ExitCode()
		}
		return code, stdout.String(), stderr.String()
	}
	withToken := []string{"IDEMPOTENCY_ADMIN_TOKEN=" + Token}
	ctx := t.Context()
	key := "order-" + time.Now().Format("150405.000000000")

	// Run once, then replayed.
	for range 2 {
		if err := charge(ctx, key, "acct"); err != nil {
			t.Fatalf("Charge: %v", err)
		}
	}
	if n := svc.count("acct"); n != 1 {
		t.Fatalf("the handler ran %d times for two calls with one key, want 1", n)
	}

	// The admin listener wants its token.
	if code, _, stderr := run(nil, "forget", "-addr", adminAddr, "-scope", scope, key); code != 1 || !strings.Contains(stderr, "Unauthenticated") {
		t.Fatalf("forget without a token: exit %d, stderr %q; want 1 and Unauthenticated", code, stderr)
	}
	if code, stdout, stderr := run(withToken, "list", "-addr", adminAddr, "-scope", scope, "-prefix", "order-"); code != 0 || !strings.Contains(stdout, key) {
		t.Fatalf("list: exit %d, stdout %q, stderr %q; want 0 and the key", code, stdout, stderr)
	}
	if code, stdout, stderr := run(withToken, "forget", "-addr", adminAddr, "-scope", scope, key); code != 0 || !strings.Contains(stdout, "runs the handler again") {
		t.Fatalf("forget: exit %d, stdout %q, stderr %q; want 0", code, stdout, stderr)
	}
	if err := charge(ctx, key, "acct"); err != nil {
		t.Fatalf("Charge after forget: %v", err)
	}
	if n := svc.count("acct"); n != 2 {
		t.Fatalf("the handler ran %d times after forget, want 2: the forgotten key should run again", n)
	}
	if code, _, stderr := run(withToken, "forget", "-addr", adminAddr, "-scope", "another", key); code != 1 || !strings.Contains(stderr, "holds nothing") {
		t.Fatalf("forget in another scope: exit %d, stderr %q; want 1, nothing to forget", code, stderr)
	}

	// A running key is refused, and forgotten with -force.
	running := key + "-running"
	first := make(chan error, 1)
	go func() { first <- charge(ctx, running, "hold") }()
	for account := ""; account != "hold"; {
		select {
		case account = <-svc.started:
		case <-time.After(30 * time.Second):
			t.Fatal("the held call did not start")
		}
	}
	if code, _, stderr := run(withToken, "forget", "-addr", adminAddr, "-scope", scope, running); code != 1 || !strings.Contains(stderr, "still running") {
		t.Fatalf("forget of a running key: exit %d, stderr %q; want 1, still running", code, stderr)
	}
	if code, stdout, _ := run(withToken, "show", "-addr", adminAddr, "-scope", scope, running); code != 0 || !strings.Contains(stdout, "running") {
		t.Fatalf("show of a running key: exit %d, stdout %q", code, stdout)
	}
	if code, stdout, stderr := run(withToken, "forget", "-addr", adminAddr, "-scope", scope, "-force", running); code != 0 || !strings.Contains(stdout, "forgot running key") {
		t.Fatalf("forget -force of a running key: exit %d, stdout %q, stderr %q; want 0", code, stdout, stderr)
	}
	second := make(chan error, 1)
	go func() { second <- charge(ctx, running, "hold") }()
	for account := ""; account != "hold"; {
		select {
		case account = <-svc.started:
		case <-time.After(30 * time.Second):
			t.Fatal("the call after forget -force did not run its handler")
		}
	}
	close(svc.release)
	for _, ch := range []chan error{first, second} {
		if err := <-ch; err != nil {
			t.Fatalf("held Charge: %v", err)
		}
	}
	if n := svc.count("hold"); n != 2 {
		t.Fatalf("the running key's handler ran %d times, want 2 after forget -force", n)
	}
	if code, stdout, stderr := run(withToken, "stats", "-addr", adminAddr); code != 0 || !strings.Contains(stdout, "store:") {
		t.Fatalf("stats: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

// serve serves s on a fresh loopback port and returns its address.
func serve(t *testing.T, s *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.Serve(lis) }()
	return lis.Addr().String()
}
