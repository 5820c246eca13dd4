package idempotency_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"

	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/memstore"
)

// payments is a test PaymentService. Every execution makes a fresh charge
// id, so a repeated id proves a replay. It sets header and trailer metadata
// (one of them binary) so that replays can be compared byte for byte.
type payments struct {
	testpb.UnimplementedPaymentServiceServer
	execs atomic.Int64
	// hold, when set, blocks each execution until it is closed.
	hold chan struct{}
	// started receives once per execution, if set.
	started chan struct{}
	// panicOnce makes the next execution panic.
	panicOnce atomic.Bool
	// failFirst makes the first n executions fail with Unavailable.
	failFirst  atomic.Int64
	mu         sync.Mutex
	keys       []string // the idempotency key each execution saw
	executions []*idempotency.Execution
	cause      error // why the context of a held execution ended
}

func (p *payments) lastCause() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cause
}

func chargeID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "ch_" + hex.EncodeToString(b[:])
}

func (p *payments) begin(ctx context.Context) error {
	p.execs.Add(1)
	p.mu.Lock()
	p.keys = append(p.keys, metadata.ValueFromIncomingContext(ctx, idempotency.KeyHeader)...)
	p.executions = append(p.executions, idempotency.ExecutionFromContext(ctx))
	p.mu.Unlock()
	if p.started != nil {
		p.started <- struct{}{}
	}
	if p.hold != nil {
		select {
		case <-p.hold:
		case <-ctx.Done():
			p.mu.Lock()
			p.cause = context.Cause(ctx)
			p.mu.Unlock()
			// Like a real payment: once started, it finishes.
			<-p.hold
		}
	}
	if p.panicOnce.CompareAndSwap(true, false) {
		panic("ledger exploded")
	}
	if p.failFirst.Add(-1) >= 0 {
		return status.Error(codes.Unavailable, "bank link down, try again")
	}
	return nil
}

func (p *payments) seenKeys() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.keys...)
}

func (p *payments) seenExecutions() []*idempotency.Execution {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]*idempotency.Execution(nil), p.executions...)
}

func validate(account string, amount int64) error {
	if account == "" || amount <= 0 {
		st := status.New(codes.InvalidArgument, "account and a positive amount are required")
		st, _ = st.WithDetails(&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: "account", Description: "must not be empty"},
		}})
		return st.Err()
	}
	if account == "flaky" {
		return status.Error(codes.Internal, "ledger hiccup")
	}
	if account == "long-message" {
		// 4,001 bytes, a two-byte character across every odd offset.
		return status.Error(codes.InvalidArgument, "x"+strings.Repeat("é", 2000))
	}
	if account == "latin1" {
		// A message in ISO 8859-1, as a handler passing on a legacy
		// system's error might send: not valid UTF-8.
		return status.Error(codes.InvalidArgument, "no such account: caf\xe9")
	}
	return nil
}

func (p *payments) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	if err := p.begin(ctx); err != nil {
		return nil, err
	}
	id := chargeID()
	_ = grpc.SetHeader(ctx, metadata.Pairs("x-charge-id", id, "x-sig-bin", string([]byte{0, 1, 0xfe, 0xff})))
	_ = grpc.SetTrailer(ctx, metadata.Pairs("x-ledger", "entry-"+id))
	if err := validate(req.Account, req.AmountCents); err != nil {
		return nil, err
	}
	return &testpb.ChargeResponse{ChargeId: id, Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}, nil
}

func (p *payments) ChargeInstallments(req *testpb.InstallmentsRequest, ss grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
	if err := p.begin(ss.Context()); err != nil {
		return err
	}
	if err := validate(req.Account, req.AmountCents); err != nil {
		return err
	}
	if req.Count <= 0 {
		return status.Error(codes.InvalidArgument, "count must be positive")
	}
	_ = ss.SetHeader(metadata.Pairs("x-plan", "installments"))
	for i := int32(0); i < req.Count; i++ {
		amount := req.AmountCents / int64(req.Count)
		if i == req.Count-1 {
			amount = req.AmountCents - amount*int64(req.Count-1)
		}
		if err := ss.Send(&testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account, AmountCents: amount, Currency: req.Currency}); err != nil {
			return err
		}
	}
	ss.SetTrailer(metadata.Pairs("x-count", "done"))
	return nil
}

func (p *payments) ChargeBatch(ss grpc.ClientStreamingServer[testpb.ChargeRequest, testpb.BatchResponse]) error {
	if err := p.begin(ss.Context()); err != nil {
		return err
	}
	out := &testpb.BatchResponse{}
	for {
		req, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if err := validate(req.Account, req.AmountCents); err != nil {
			return err
		}
		out.Charges = append(out.Charges, &testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency})
	}
	_ = grpc.SetHeader(ss.Context(), metadata.Pairs("x-batch", "1"))
	return ss.SendAndClose(out)
}

func (p *payments) ChargeInteractive(ss grpc.BidiStreamingServer[testpb.ChargeRequest, testpb.ChargeResponse]) error {
	if err := p.begin(ss.Context()); err != nil {
		return err
	}
	for {
		req, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			ss.SetTrailer(metadata.Pairs("x-interactive", "closed"))
			return nil
		}
		if err != nil {
			return err
		}
		if err := validate(req.Account, req.AmountCents); err != nil {
			return err
		}
		if err := ss.Send(&testpb.ChargeResponse{ChargeId: chargeID(), Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}); err != nil {
			return err
		}
	}
}

// env is one gRPC server with the idempotency interceptors, on bufconn.
type env struct {
	svc    *payments
	store  idempotency.Store
	conn   *grpc.ClientConn
	client testpb.PaymentServiceClient
}

type envConfig struct {
	server    []idempotency.Option
	client    []grpc.DialOption
	serverOpt []grpc.ServerOption
	// service replaces the payments service (env.svc is then nil).
	service testpb.PaymentServiceServer
}

func newEnv(t testing.TB, store idempotency.Store, cfg envConfig) *env {
	t.Helper()
	e := &env{store: store}
	svc := cfg.service
	if svc == nil {
		e.svc = &payments{}
		svc = e.svc
	}
	lis := bufconn.Listen(1 << 20)
	// cfg.serverOpt comes first, so that its interceptors run outside ours.
	sopts := append(cfg.serverOpt[:len(cfg.serverOpt):len(cfg.serverOpt)], mustServer(store, cfg.server...).ServerOptions()...)
	srv := grpc.NewServer(sopts...)
	testpb.RegisterPaymentServiceServer(srv, svc)
	go func() { _ = srv.Serve(lis) }()
	dopts := append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, cfg.client...)
	conn, err := grpc.NewClient("passthrough:///bufnet", dopts...)
	require.NoError(t, err)
	e.conn = conn
	e.client = testpb.NewPaymentServiceClient(conn)
	t.Cleanup(func() {
		conn.Close()
		srv.Stop()
	})
	return e
}

// stores runs f once per in-tree store.
func stores(t *testing.T, f func(t *testing.T, newStore func(t testing.TB) idempotency.Store)) {
	t.Run("memory", func(t *testing.T) {
		f(t, func(t testing.TB) idempotency.Store {
			s := memstore.New()
			t.Cleanup(func() { s.Close() })
			return s
		})
	})
	t.Run("bolt", func(t *testing.T) {
		f(t, func(t testing.TB) idempotency.Store {
			return openBolt(t, filepath.Join(t.TempDir(), "idem.db"))
		})
	})
}

func openBolt(t testing.TB, path string, opts ...boltstore.Option) *boltstore.Store {
	t.Helper()
	s, err := boltstore.Open(path, opts...)
	require.NoError(t, err)
	t.Cleanup(func() {
		s.Close()
		checkBolt(t, path)
	})
	return s
}

// checkBolt verifies the consistency of a closed bbolt file, as bbolt's own
// tests do after each one.
func checkBolt(t testing.TB, path string) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Errorf("reopen %s for a consistency check: %v", path, err)
		return
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			t.Errorf("bbolt consistency check of %s: %v", path, err)
		}
		return nil
	})
	require.NoError(t, err)
}

func withKey(ctx context.Context, key string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, key)
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// stripped removes the metadata that gRPC itself adds, leaving the handler's.
func stripped(md metadata.MD) metadata.MD {
	out := md.Copy()
	for _, k := range []string{"content-type", idempotency.ReplayedHeader} {
		delete(out, k)
	}
	return out
}

func mustMarshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	require.NoError(t, err)
	return b
}

func statusBytes(t testing.TB, err error) []byte {
	t.Helper()
	st, ok := status.FromError(err)
	require.True(t, ok, "not a status error: %v", err)
	return mustMarshal(t, st.Proto())
}

// failingStore is a Store whose every call fails, as an unreachable one does.
type failingStore struct{ idempotency.Store }

var errStoreDown = errors.New("connection refused")

func (failingStore) Reserve(context.Context, string, idempotency.Claim) (idempotency.Entry, error) {
	return idempotency.Entry{}, errStoreDown
}

// mustServer returns the idempotency server of a test; an option out of range
// is a bug in the test.
func mustServer(store idempotency.Store, opts ...idempotency.Option) *idempotency.Server {
	s, err := idempotency.NewServer(store, opts...)
	if err != nil {
		panic(err)
	}
	return s
}

// serverProcess is this test binary run again as a server, by the test named
// run, with env set; the child prints "ADDR host:port" once it serves.
type serverProcess struct {
	addr string
	cmd  *exec.Cmd
	once sync.Once
}

// startServerProcess starts it and waits for its address. The process is
// killed (and resumed first, if it was stopped) when the test ends.
func startServerProcess(t *testing.T, run, env string) *serverProcess {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^"+run+"$", "-test.count=1")
	cmd.Env = append(os.Environ(), env)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	p := &serverProcess{cmd: cmd}
	t.Cleanup(p.kill)
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if a, ok := strings.CutPrefix(sc.Text(), "ADDR "); ok {
				addr <- a
			}
		}
	}()
	select {
	case p.addr = <-addr:
		return p
	case <-time.After(30 * time.Second):
		t.Fatal("the server process did not start")
		return nil
	}
}

// kill ends the process with SIGKILL and waits for it.
func (p *serverProcess) kill() {
	p.once.Do(func() {
		_ = p.cmd.Process.Signal(syscall.SIGCONT)
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	})
}
