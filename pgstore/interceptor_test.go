package pgstore_test

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/pgstore"
)

// txPayments charges by inserting a row in the handler's transaction, so a
// charge exists if and only if its record does.
type txPayments struct {
	testpb.UnimplementedPaymentServiceServer
	store *pgstore.Store
	biz   business
	runs  atomic.Int64
	// hook, if set, runs after the insert; a non-nil error is returned as
	// the call's outcome.
	hook func(ctx context.Context, run int64, tx pgx.Tx) error
}

func (p *txPayments) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	run := p.runs.Add(1)
	tx, err := p.store.BeginTx(ctx)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "begin: %v", err)
	}
	id := "ch_" + randomHex(8)
	exec := idempotency.ExecutionFromContext(ctx)
	if _, err := tx.Exec(ctx, "INSERT INTO "+p.biz.ident()+" (charge, idem_key) VALUES ($1, $2)", id, exec.Key); err != nil {
		return nil, status.Errorf(codes.Internal, "insert: %v", err)
	}
	if p.hook != nil {
		if err := p.hook(ctx, run, tx); err != nil {
			return nil, err
		}
	}
	return &testpb.ChargeResponse{ChargeId: id, Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}, nil
}

// serve runs p behind the idempotency interceptor on lis until the test ends.
func serve(t *testing.T, lis net.Listener, p *txPayments, opts ...idempotency.Option) {
	t.Helper()
	serveService(t, lis, p.store, p, opts...)
}

// serveService runs svc behind the unary and stream idempotency
// interceptors on store, on lis, until the test ends.
func serveService(t *testing.T, lis net.Listener, store idempotency.Store, svc testpb.PaymentServiceServer, opts ...idempotency.Option) {
	t.Helper()
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(mustServer(store, opts...).UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(mustServer(store, opts...).StreamServerInterceptor()))
	testpb.RegisterPaymentServiceServer(srv, svc)
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(lis)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
	})
}

func dial(t *testing.T, target string, opts ...grpc.DialOption) testpb.PaymentServiceClient {
	t.Helper()
	opts = append(opts,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor(
			idempotency.WithMaxAttempts(5), idempotency.WithBackoff(10*time.Millisecond, 200*time.Millisecond))),
		grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor()))
	cc, err := grpc.NewClient(target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return testpb.NewPaymentServiceClient(cc)
}

func bufServer(t *testing.T, p *txPayments, opts ...idempotency.Option) testpb.PaymentServiceClient {
	t.Helper()
	return bufService(t, p.store, p, opts...)
}

// bufService serves svc on store over an in-memory connection and returns a
// client of it.
func bufService(t *testing.T, store idempotency.Store, svc testpb.PaymentServiceServer, opts ...idempotency.Option) testpb.PaymentServiceClient {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	serveService(t, lis, store, svc, opts...)
	return dial(t, "passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }))
}

type callResult struct {
	resp     *testpb.ChargeResponse
	err      error
	replayed bool
	attempts int
}

func charge(ctx context.Context, c testpb.PaymentServiceClient, k string, opts ...grpc.CallOption) callResult {
	var r callResult
	opts = append(opts, idempotency.WithKey(k), idempotency.Replayed(&r.replayed), idempotency.Attempts(&r.attempts))
	r.resp, r.err = c.Charge(ctx, &testpb.ChargeRequest{Account: "acct", AmountCents: 500, Currency: "EUR"}, opts...)
	return r
}

// TestInterceptorTransactional runs transactional mode end to end: a real
// gRPC server, the interceptors on both sides, a handler that writes its
// charge with BeginTx.
func TestInterceptorTransactional(t *testing.T) {
	pool, _, store := setup(t)
	biz := newBusiness(t, pool)
	p := &txPayments{store: store, biz: biz}
	client := bufServer(t, p, idempotency.WithLease(time.Second))
	ctx := t.Context()

	t.Run("first execution and replay", func(t *testing.T) {
		p.hook = nil
		before := p.runs.Load()
		k := idempotency.NewKey()
		first := charge(ctx, client, k)
		if first.err != nil || first.replayed {
			t.Fatalf("first call: %v, replayed %v", first.err, first.replayed)
		}
		second := charge(ctx, client, k)
		if second.err != nil || !second.replayed || second.resp.ChargeId != first.resp.ChargeId {
			t.Fatalf("second call: %v, replayed %v, charge %v; want the replay of %s", second.err, second.replayed, second.resp, first.resp.ChargeId)
		}
		if n := biz.rows(t, k); n != 1 {
			t.Fatalf("%d charges, want 1", n)
		}
		if runs := p.runs.Load() - before; runs != 1 {
			t.Fatalf("the handler ran %d times, want 1", runs)
		}
	})

	t.Run("failed call rolls back its writes", func(t *testing.T) {
		before := p.runs.Load()
		p.hook = func(_ context.Context, run int64, _ pgx.Tx) error {
			if run == before+1 {
				return status.Error(codes.Unavailable, "bank link down")
			}
			return nil
		}
		k := idempotency.NewKey()
		r := charge(ctx, client, k)
		if r.err != nil || r.replayed || r.attempts != 2 {
			t.Fatalf("call: %v, replayed %v, attempts %d; want success on the second attempt", r.err, r.replayed, r.attempts)
		}
		if n := biz.rows(t, k); n != 1 {
			t.Fatalf("%d charges, want 1: the failed attempt's row must be rolled back", n)
		}
	})

	t.Run("killed transaction", func(t *testing.T) {
		before := p.runs.Load()
		p.hook = func(ctx context.Context, run int64, tx pgx.Tx) error {
			if run != before+1 {
				return nil
			}
			// The database session dies after the charge was written
			// and before the record is: as if the server crashed.
			var pid uint32
			if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
				return err
			}
			_, err := pool.Exec(ctx, "SELECT pg_terminate_backend($1)", pid)
			return err
		}
		k := idempotency.NewKey()
		r := charge(ctx, client, k)
		if r.err != nil || r.replayed || r.attempts < 2 {
			t.Fatalf("call: %v, replayed %v, attempts %d; want success after the rolled-back attempt", r.err, r.replayed, r.attempts)
		}
		if runs := p.runs.Load() - before; runs != 2 {
			t.Fatalf("the handler ran %d times, want 2", runs)
		}
		if n := biz.rows(t, k); n != 1 {
			t.Fatalf("%d charges, want exactly 1", n)
		}
		again := charge(ctx, client, k)
		if again.err != nil || !again.replayed || again.resp.ChargeId != r.resp.ChargeId {
			t.Fatalf("replay: %v, replayed %v", again.err, again.replayed)
		}
	})

	t.Run("aborted answer without retries", func(t *testing.T) {
		before := p.runs.Load()
		p.hook = func(ctx context.Context, run int64, tx pgx.Tx) error {
			if run != before+1 {
				return nil
			}
			var pid uint32
			tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid)
			_, err := pool.Exec(ctx, "SELECT pg_terminate_backend($1)", pid)
			return err
		}
		k := idempotency.NewKey()
		r := charge(ctx, client, k, idempotency.WithMaxAttempts(1))
		if status.Code(r.err) != codes.Aborted {
			t.Fatalf("call whose transaction died: %v, want Aborted", r.err)
		}
		if n := biz.rows(t, k); n != 0 {
			t.Fatalf("%d charges after Aborted, want 0", n)
		}
	})
}

// replica is one server process of a service: its own pool, Store and
// gRPC server on a loopback port.
type replica struct {
	pool   *pgxpool.Pool
	store  *pgstore.Store
	p      *txPayments
	client testpb.PaymentServiceClient
}

func startReplicas(t *testing.T, n int, table string, biz business) []*replica {
	t.Helper()
	var rs []*replica
	for range n {
		pool := newPool(t, func(c *pgxpool.Config) { c.MaxConns = 12 })
		store := newStore(t, pool, table)
		r := &replica{pool: pool, store: store, p: &txPayments{store: store, biz: biz}}
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		serve(t, lis, r.p, idempotency.WithLease(time.Second))
		r.client = dial(t, lis.Addr().String())
		rs = append(rs, r)
	}
	return rs
}

// TestReplicas: three servers, each with its own pool and Store, share one
// table. Duplicates spread across them run once and the others replay; a
// replica that dies mid-handler lets a retry elsewhere run after its lease.
func TestReplicas(t *testing.T) {
	pool := newPool(t, nil)
	table := newTable(t, pool)
	biz := newBusiness(t, pool)
	rs := startReplicas(t, 3, table, biz)
	ctx := t.Context()

	t.Run("duplicates run once", func(t *testing.T) {
		gate := make(chan struct{})
		for _, r := range rs {
			r.p.hook = func(ctx context.Context, _ int64, _ pgx.Tx) error {
				<-gate // hold every first execution until the duplicates are in
				return nil
			}
		}
		const keys, dups = 4, 9
		var wg sync.WaitGroup
		results := make([][]callResult, keys)
		for i := range keys {
			k := idempotency.NewKey()
			results[i] = make([]callResult, dups)
			for j := range dups {
				wg.Go(func() { results[i][j] = charge(ctx, rs[(i+j)%len(rs)].client, k) })
			}
		}
		time.Sleep(200 * time.Millisecond) // let duplicates queue up; correct either way
		close(gate)
		wg.Wait()
		var runs int64
		for _, r := range rs {
			runs += r.p.runs.Load()
		}
		if runs != keys {
			t.Fatalf("handlers ran %d times for %d keys", runs, keys)
		}
		for i, res := range results {
			fresh := 0
			for j, r := range res {
				if r.err != nil {
					t.Fatalf("key %d call %d: %v", i, j, r.err)
				}
				if r.resp.ChargeId != res[0].resp.ChargeId {
					t.Fatalf("key %d: charges %s and %s", i, res[0].resp.ChargeId, r.resp.ChargeId)
				}
				if !r.replayed {
					fresh++
				}
			}
			if fresh != 1 {
				t.Fatalf("key %d: %d answers not marked replayed, want 1", i, fresh)
			}
		}
		for _, r := range rs {
			r.p.hook = nil
		}
	})

	t.Run("replica dies mid-handler", func(t *testing.T) {
		dead, other := rs[0], rs[1]
		pids := make(chan uint32, 1)
		unblock := make(chan struct{})
		dead.p.hook = func(ctx context.Context, _ int64, tx pgx.Tx) error {
			var pid uint32
			if err := tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
				return err
			}
			pids <- pid
			<-unblock
			return nil
		}
		k := idempotency.NewKey()
		deadDone := make(chan callResult, 1)
		go func() { deadDone <- charge(ctx, dead.client, k, idempotency.WithMaxAttempts(1)) }()
		pid := <-pids
		// The replica dies: its database session goes (taking the
		// uncommitted charge with it) and its lease is renewed no more.
		if _, err := pool.Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
			t.Fatal(err)
		}
		dead.store.Close()

		r := charge(ctx, other.client, k)
		if r.err != nil || r.replayed {
			t.Fatalf("retry on another replica: %v, replayed %v; want a fresh execution", r.err, r.replayed)
		}
		if n := biz.rows(t, k); n != 1 {
			t.Fatalf("%d charges, want 1", n)
		}
		close(unblock)
		if d := <-deadDone; d.err == nil {
			t.Fatal("the dead replica's call succeeded; its outcome must not count")
		}
		if n := biz.rows(t, k); n != 1 {
			t.Fatalf("%d charges after the dead replica's handler returned, want 1", n)
		}
		replay := charge(ctx, rs[2].client, k)
		if replay.err != nil || !replay.replayed || replay.resp.ChargeId != r.resp.ChargeId {
			t.Fatalf("replay on a third replica: %v, replayed %v", replay.err, replay.replayed)
		}
	})
}

// TestInterceptorStatements counts what a call costs the database through
// the interceptor: a replay is one statement (Reserve); a first execution in
// transactional mode is Reserve, then the handler's BEGIN and INSERT, then
// Complete and COMMIT, and no notification, since no duplicate waited.
func TestInterceptorStatements(t *testing.T) {
	counter := &queryCounter{}
	pool := newPool(t, func(c *pgxpool.Config) { c.ConnConfig.Tracer = counter })
	store := newStore(t, pool, newTable(t, pool))
	client := bufServer(t, &txPayments{store: store, biz: newBusiness(t, pool)})
	ctx := t.Context()
	k := idempotency.NewKey()

	before := counter.n.Load()
	if r := charge(ctx, client, k); r.err != nil {
		t.Fatal(r.err)
	}
	time.Sleep(200 * time.Millisecond) // a notification would be sent after the answer: so that it is counted
	if got := counter.since(before); len(got) != 5 {
		t.Fatalf("a first execution sent %d statements, want 5: %q", len(got), got)
	}
	before = counter.n.Load()
	if r := charge(ctx, client, k); r.err != nil || !r.replayed {
		t.Fatal(r.err, r.replayed)
	}
	if got := counter.since(before); len(got) != 1 {
		t.Fatalf("a replay sent %d statements, want 1: %q", len(got), got)
	}
}
