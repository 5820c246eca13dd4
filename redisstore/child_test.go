package redisstore_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Some tests run replicas as processes of their own, so that they can be
// paused (SIGSTOP) as a whole, runtime timers and Redis connections
// included, the way a frozen VM or a stop-the-world stall pauses a server.
// A child is this test binary, started with childEnv set: TestMain then
// serves instead of running tests.
const (
	childEnv       = "REDISSTORE_TEST_CHILD"         // the replica's name
	childPrefixEnv = "REDISSTORE_TEST_CHILD_PREFIX"  // its store prefix
	childOnLostEnv = "REDISSTORE_TEST_CHILD_ON_LOST" // "finish" or "abort"
	childModeEnv   = "REDISSTORE_TEST_CHILD_MODE"    // a storeMode's name
)

// childLease is the lease of the child replicas: the shortest the
// interceptors allow, so that a pause of a few seconds outlasts it.
const childLease = time.Second

// childSteps and childStep make the child's handler: three seconds of work
// in steps, so that a pause of the process stops the work and the handler
// runs on for what was left when it resumes, as a computation would.
const (
	childSteps = 30
	childStep  = 100 * time.Millisecond
)

// serveChild is a child replica: the payments service with the idempotency
// interceptor on a redisstore under the prefix the parent gave. It serves
// until its parent goes (its stdin closes), or for two minutes at most, and
// exits.
func serveChild(name string) {
	prefix := os.Getenv(childPrefixEnv)
	rc := redis.NewClient(&redis.Options{Addr: redisAddr()})
	opts := []redisstore.Option{redisstore.WithPrefix(prefix)}
	for _, m := range storeModes {
		if m.name == os.Getenv(childModeEnv) {
			opts = m.with(opts...)
		}
	}
	st, err := redisstore.New(rc, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(2)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(mustServer(st, idempotency.WithLease(childLease)).UnaryServerInterceptor()))
	testpb.RegisterPaymentServiceServer(srv, &childPayments{name: name, prefix: prefix, redis: rc, onLost: os.Getenv(childOnLostEnv)})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(2)
	}
	go func() { _ = srv.Serve(lis) }()
	fmt.Printf("ADDR %s\n", lis.Addr())
	parentGone := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(parentGone)
	}()
	select {
	case <-parentGone:
	case <-time.After(2 * time.Minute):
	}
	os.Exit(0)
}

// childPayments is the child's service. Its Charge counts each execution in
// Redis (execsKey), where the parent reads it; the count is the side
// effect that must happen once per key. When its context is cancelled it
// records why (cancelledKey), then returns Aborted, or with onLost
// "finish" its response all the same, as a handler already past its side
// effect would.
type childPayments struct {
	testpb.UnimplementedPaymentServiceServer
	name, prefix string
	redis        *redis.Client
	onLost       string
}

func execsKey(prefix, account string) string { return prefix + "execs:" + account }

func cancelledKey(prefix, account, replica string) string {
	return prefix + "cancelled:" + account + ":" + replica
}

func (p *childPayments) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	bg := context.WithoutCancel(ctx)
	if err := p.redis.Incr(bg, execsKey(p.prefix, req.Account)).Err(); err != nil {
		return nil, status.Errorf(codes.Internal, "counting the execution: %v", err)
	}
	if err := grpc.SetHeader(ctx, metadata.Pairs("charged-by", p.name)); err != nil {
		return nil, err
	}
	resp := &testpb.ChargeResponse{
		ChargeId:    p.name + "-" + randomHex(8),
		Account:     req.Account,
		AmountCents: req.AmountCents,
		Currency:    req.Currency,
	}
	for range childSteps {
		select {
		case <-time.After(childStep):
		case <-ctx.Done():
			cause := context.Cause(ctx)
			execErr := idempotency.ExecutionFromContext(ctx).Err()
			why := fmt.Sprintf("cause=%q causeIsLeaseLost=%t execErr=%q execErrIsLeaseLost=%t",
				fmt.Sprint(cause), errors.Is(cause, idempotency.ErrLeaseLost), fmt.Sprint(execErr), errors.Is(execErr, idempotency.ErrLeaseLost))
			if err := p.redis.Set(bg, cancelledKey(p.prefix, req.Account, p.name), why, time.Hour).Err(); err != nil {
				return nil, status.Errorf(codes.Internal, "recording the cancellation: %v", err)
			}
			if p.onLost == "finish" {
				return resp, nil
			}
			return nil, status.Errorf(codes.Aborted, "handler stopped: %v", cause)
		}
	}
	return resp, nil
}

// A child is a replica process the test started.
type child struct {
	name   string
	cmd    *exec.Cmd
	client testpb.PaymentServiceClient
}

// startChild starts a child replica named name on the store prefix, its
// store in mode m, and
// kills it at cleanup. onLost is what its handler does when its context is
// cancelled ("finish" or "abort"). The child's log is shown if the test
// fails.
func startChild(t *testing.T, m storeMode, prefix, name, onLost string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+name, childPrefixEnv+"="+prefix, childOnLostEnv+"="+onLost, childModeEnv+"="+m.name)
	var logs syncBuffer
	cmd.Stderr = &logs
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Process.Kill() // works on a stopped process too
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("log of replica %s:\n%s", name, logs.String())
		}
	})
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "ADDR "); ok {
				addr <- a
			}
		}
	}()
	var a string
	select {
	case a = <-addr:
	case <-time.After(eventually):
		t.Fatalf("replica %s did not start", name)
	}
	conn, err := grpc.NewClient(a, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return &child{name: name, cmd: cmd, client: testpb.NewPaymentServiceClient(conn)}
}

// syncBuffer is a bytes.Buffer for a child's stderr, read at cleanup.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
