package payments_test

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/examples/internal/stores"
	"github.com/grpcidem/idempotency/examples/payments/internal/app"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"

	"github.com/grpcidem/idempotency/boltstore"
)

// syncBuffer is an output stream written by a command's goroutines and read
// by the test; it reports the server's address once the server prints it.
type syncBuffer struct {
	mu    sync.Mutex
	b     bytes.Buffer
	ready chan string // gets the address, once, if not nil
	sent  bool
}

var listeningRE = regexp.MustCompile(`payments server listening on (\S+) `)

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.b.Write(p)
	if s.ready != nil && !s.sent {
		if m := listeningRE.FindSubmatch(s.b.Bytes()); m != nil {
			s.ready <- string(m[1])
			s.sent = true
		}
	}
	return n, err
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type server struct {
	addr        string
	cancel      context.CancelFunc
	done        chan error
	out, errOut *syncBuffer
	stopped     bool
}

// startServer runs the server command on a free loopback port.
func startServer(t *testing.T, args ...string) *server {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &server{cancel: cancel, done: make(chan error, 1), out: &syncBuffer{ready: make(chan string, 1)}, errOut: &syncBuffer{}}
	go func() {
		s.done <- app.RunServer(ctx, append([]string{"-addr", "127.0.0.1:0", "-http", ""}, args...), s.out, s.errOut)
	}()
	select {
	case s.addr = <-s.out.ready:
	case err := <-s.done:
		cancel()
		t.Fatalf("server exited before listening: %v\nstderr:\n%s", err, s.errOut)
	case <-time.After(time.Minute):
		cancel()
		t.Fatalf("server did not listen within a minute\nstderr:\n%s", s.errOut)
	}
	t.Cleanup(func() {
		if !s.stopped {
			s.stop(t)
		}
	})
	return s
}

// stop does what SIGTERM does, and returns the server's stdout.
func (s *server) stop(t *testing.T) string {
	t.Helper()
	s.stopped = true
	s.cancel()
	select {
	case err := <-s.done:
		require.NoError(t, err, "stderr:\n%s", s.errOut)
	case <-time.After(time.Minute):
		t.Fatalf("server did not stop within a minute\nstderr:\n%s", s.errOut)
	}
	return s.out.String()
}

var statsRE = regexp.MustCompile(`payments server stopped: (\d+) executions \((\d+) charges\), (\d+) replays, (\d+) injected failures`)

type serverStats struct{ executions, charges, replays, injected int }

func parseStats(t *testing.T, out string) serverStats {
	t.Helper()
	m := statsRE.FindStringSubmatch(out)
	require.NotNil(t, m, "no summary in the server's output:\n%s", out)
	n := func(i int) int { v, _ := strconv.Atoi(m[i]); return v }
	return serverStats{n(1), n(2), n(3), n(4)}
}

type payment struct {
	key      string
	attempts int
	replayed bool
	charges  []string
	amounts  []string
	err      string
}

var (
	paymentRE = regexp.MustCompile(`^payment \d+/\d+  key (\S+)  attempts (\d+)  (?:replayed (true|false)|error: (.*))$`)
	chargeRE  = regexp.MustCompile(`^  charge (ch_[0-9a-f]{24})  \S+  (\d+\.\d\d) [A-Z]+$`)
)

func parsePayments(t *testing.T, out string) []payment {
	t.Helper()
	var ps []payment
	for _, line := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		if m := paymentRE.FindStringSubmatch(line); m != nil {
			a, _ := strconv.Atoi(m[2])
			ps = append(ps, payment{key: m[1], attempts: a, replayed: m[3] == "true", err: m[4]})
			continue
		}
		m := chargeRE.FindStringSubmatch(line)
		require.NotNil(t, m, "unexpected line in the client's output: %q\n%s", line, out)
		require.NotEmpty(t, ps, "a charge before any payment:\n%s", out)
		p := &ps[len(ps)-1]
		p.charges = append(p.charges, m[1])
		p.amounts = append(p.amounts, m[2])
	}
	return ps
}

// runClient runs the client command against addr and parses what it
// printed.
func runClient(t *testing.T, addr string, args ...string) ([]payment, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, errOut syncBuffer
	err := app.RunClient(ctx, append([]string{"-addr", addr}, args...), &out, &errOut)
	return parsePayments(t, out.String()), err
}

// storeArgs returns the server flags of each store kind, skipping the
// networked ones that are not reachable (and failing when CI=true says
// they must be).
func storeArgs(t *testing.T, kind string) []string {
	t.Helper()
	switch kind {
	case "bolt":
		return []string{"-store", "bolt", "-db", filepath.Join(t.TempDir(), "idem.db")}
	case "memory":
		return []string{"-store", "memory"}
	}
	cfg := stores.RegisterFlags(flag.NewFlagSet("test", flag.ContinueOnError), "")
	cfg.Kind = kind
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := stores.Open(ctx, *cfg)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("the %s store must be reachable in CI: %v", kind, err)
		}
		t.Skipf("the %s store is not reachable (%v); start it or set REDIS_ADDR / POSTGRES_DSN", kind, err)
	}
	require.NoError(t, s.Close())
	return []string{"-store", kind, "-redis", cfg.RedisAddr, "-postgres", cfg.PostgresDSN}
}

func TestClientAndServerOverTCP(t *testing.T) {
	for _, kind := range stores.Kinds {
		t.Run(kind, func(t *testing.T) {
			srv := startServer(t, storeArgs(t, kind)...)
			// Keys unique to this run: the Redis and PostgreSQL stores
			// outlive it.
			prefix := idempotency.NewKey()

			wantCharges := map[string]int{"unary": 1, "installments": 3, "batch": 3, "interactive": 3}
			for _, mode := range app.Modes {
				ps, err := runClient(t, srv.addr, "-mode", mode, "-key", prefix+"-"+mode, "-n", "3", "-amount", "1000", "-count", "3")
				require.NoError(t, err)
				require.Len(t, ps, 3, mode)
				for i, p := range ps {
					require.Equal(t, prefix+"-"+mode, p.key)
					require.Equal(t, 1, p.attempts, "%s payment %d", mode, i+1)
					require.Equal(t, i > 0, p.replayed, "%s payment %d: only the first is executed", mode, i+1)
					require.Len(t, p.charges, wantCharges[mode])
					require.Equal(t, ps[0].charges, p.charges, "%s payment %d: a replay carries the first execution's charges", mode, i+1)
				}
				if mode != "unary" {
					require.Equal(t, []string{"3.34", "3.33", "3.33"}, ps[0].amounts, mode)
				}
			}

			// Without -key, each payment has a fresh key: two charges.
			ps, err := runClient(t, srv.addr, "-n", "2")
			require.NoError(t, err)
			require.Len(t, ps, 2)
			require.NotEqual(t, ps[0].key, ps[1].key)
			require.NotEqual(t, ps[0].charges, ps[1].charges)
			require.False(t, ps[0].replayed || ps[1].replayed)

			st := parseStats(t, srv.stop(t))
			require.Equal(t, serverStats{executions: 6, charges: 1 + 3*3 + 2, replays: 8}, st)
		})
	}
}

func TestInjectedFailuresAreRetriedWithTheSameKey(t *testing.T) {
	srv := startServer(t, "-store", "memory", "-fail-every", "2")
	// Executions 2 and 4 fail: the second payment takes two attempts, as
	// does the retry of the third, whose key is then replayed.
	ps, err := runClient(t, srv.addr, "-n", "2")
	require.NoError(t, err)
	require.Len(t, ps, 2)
	require.Equal(t, 1, ps[0].attempts)
	require.Equal(t, 2, ps[1].attempts)
	require.False(t, ps[1].replayed, "the failed execution was not stored, so the retry ran the handler")

	ps, err = runClient(t, srv.addr, "-mode", "installments", "-key", "inst-1", "-n", "2")
	require.NoError(t, err)
	require.Equal(t, 2, ps[0].attempts, "a server stream that failed before its first answer is retried")
	require.Equal(t, 1, ps[1].attempts)
	require.True(t, ps[1].replayed)
	require.Equal(t, ps[0].charges, ps[1].charges)

	// Client streams are retried by the client command itself, with the key.
	ps, err = runClient(t, srv.addr, "-mode", "batch", "-n", "1")
	require.NoError(t, err)
	require.Equal(t, 2, ps[0].attempts)

	st := parseStats(t, srv.stop(t))
	require.Equal(t, serverStats{executions: 4, charges: 1 + 1 + 3 + 3, replays: 1, injected: 3}, st)
}

func TestTenantsDoNotShareKeys(t *testing.T) {
	srv := startServer(t, "-store", "memory")
	a, err := runClient(t, srv.addr, "-tenant", "alice", "-key", "order-1")
	require.NoError(t, err)
	b, err := runClient(t, srv.addr, "-tenant", "bob", "-key", "order-1")
	require.NoError(t, err)
	require.False(t, b[0].replayed, "another tenant's key is another key")
	require.NotEqual(t, a[0].charges, b[0].charges)
	again, err := runClient(t, srv.addr, "-tenant", "alice", "-key", "order-1")
	require.NoError(t, err)
	require.True(t, again[0].replayed)
	require.Equal(t, a[0].charges, again[0].charges)
}

func TestInvalidChargeIsReplayedToo(t *testing.T) {
	srv := startServer(t, "-store", "memory")
	ps, err := runClient(t, srv.addr, "-key", "bad-1", "-amount", "0", "-n", "2")
	require.Error(t, err)
	require.Len(t, ps, 2)
	for _, p := range ps {
		require.Contains(t, p.err, "code = InvalidArgument")
		require.Contains(t, p.err, "amount_cents is 0")
		require.Equal(t, 1, p.attempts, "InvalidArgument is not retried")
	}
	st := parseStats(t, srv.stop(t))
	require.Equal(t, 0, st.executions)
	require.Equal(t, 1, st.replays, "the stored InvalidArgument answers the duplicate")
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { cc.Close() })
	return cc
}

// payments.proto declares that Charge requires a key: there is no flag to
// turn that off any more.
func TestKeyIsRequired(t *testing.T) {
	req := &paymentsv1.ChargeRequest{Account: "acct_1", AmountCents: 100, Currency: "EUR"}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	srv := startServer(t, "-store", "memory")
	client := paymentsv1.NewPaymentServiceClient(dial(t, srv.addr))
	_, err := client.Charge(ctx, req)
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), idempotency.KeyHeader)
	require.Contains(t, status.Convert(err).Message(), "request_id")
	kctx := metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, "has space")
	_, err = client.Charge(kctx, req)
	require.Equal(t, codes.InvalidArgument, status.Code(err), "a bad key is refused: %v", err)

	var out, errOut bytes.Buffer
	err = app.RunServer(ctx, []string{"-require-key=false"}, &out, &errOut)
	require.Error(t, err)
	require.Contains(t, errOut.String(), "flag provided but not defined: -require-key")
}

// TestReflectionListsThePaymentService checks what grpcurl and ghz need.
func TestReflectionListsThePaymentService(t *testing.T) {
	srv := startServer(t, "-store", "memory")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stream, err := reflectionpb.NewServerReflectionClient(dial(t, srv.addr)).ServerReflectionInfo(ctx)
	require.NoError(t, err)
	require.NoError(t, stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}))
	resp, err := stream.Recv()
	require.NoError(t, err)
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	require.Contains(t, names, "payments.v1.PaymentService")
}

func TestBadCommandLines(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, errOut bytes.Buffer
	err := app.RunServer(ctx, []string{"-store", "nope"}, &out, &errOut)
	require.ErrorContains(t, err, `unknown store "nope"`)
	err = app.RunServer(ctx, []string{"-fail-every", "-1"}, &out, &errOut)
	require.ErrorContains(t, err, "-fail-every")
	err = app.RunServer(ctx, []string{"-no-such-flag"}, &out, &errOut)
	require.Error(t, err)
	require.Contains(t, errOut.String(), "flag provided but not defined")

	err = app.RunClient(ctx, []string{"-mode", "nope"}, &out, &errOut)
	require.ErrorContains(t, err, `-mode "nope"`)
	err = app.RunClient(ctx, []string{"-key", "has space"}, &out, &errOut)
	require.ErrorContains(t, err, "-key")
	err = app.RunDemo(ctx, []string{"-parts", "0"}, &out, &errOut)
	require.ErrorContains(t, err, "-parts")
}

func TestSecondServerOnTheSameBoltFileFailsFast(t *testing.T) {
	db := filepath.Join(t.TempDir(), "idem.db")
	startServer(t, "-store", "bolt", "-db", db)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, errOut bytes.Buffer
	err := app.RunServer(ctx, []string{"-addr", "127.0.0.1:0", "-store", "bolt", "-db", db}, &out, &errOut)
	require.ErrorIs(t, err, boltstore.ErrLocked)
}

func TestClientReportsUnreachableServer(t *testing.T) {
	// A port nothing listens on: a server that started and stopped.
	srv := startServer(t, "-store", "memory")
	srv.stop(t)
	ps, err := runClient(t, srv.addr, "-attempts", "2", "-timeout", "20s")
	require.ErrorContains(t, err, "1 payment failed")
	require.Len(t, ps, 1)
	require.Equal(t, 2, ps[0].attempts, "Unavailable is retried")
	require.Contains(t, ps[0].err, "code = Unavailable")
}

var totalRE = regexp.MustCompile(`(?m)^\s*total\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$`)

func TestDemo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out, errOut syncBuffer
	err := app.RunDemo(ctx, []string{"-dir", t.TempDir()}, &out, &errOut)
	require.NoError(t, err, "output:\n%s\nstderr:\n%s", &out, &errOut)
	m := totalRE.FindStringSubmatch(out.String())
	require.NotNil(t, m, "no total row:\n%s", &out)
	n := func(i int) int { v, _ := strconv.Atoi(m[i]); return v }
	payments, attempts, lost, injected, replays, executions := n(1), n(2), n(3), n(4), n(5), n(6)
	require.Equal(t, 70, payments)
	require.Equal(t, payments, executions, "executions must equal logical payments")
	require.Positive(t, lost, "the link must lose answers for the demo to show anything")
	require.Positive(t, injected)
	require.GreaterOrEqual(t, replays, lost, "every lost answer is answered again from the store")
	require.Equal(t, attempts, executions+injected+replays)
	require.Contains(t, out.String(), fmt.Sprintf("Handler executions: %d for %d logical payments: OK.", executions, payments))
	require.Contains(t, out.String(), "After a restart on the same bbolt file, a retry of the first payment got charge")
	require.NotContains(t, out.String(), "FAILED")
}
