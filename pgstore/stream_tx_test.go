package pgstore_test

import (
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/pgstore"
)

// TestStreamTransactional: a server-streaming handler that calls
// BeginTx(stream.Context()) gets the call's transaction, as a unary handler
// does: its rows commit with the record of the whole stream, after its last
// message, and a duplicate replays the messages without writing again. If
// the commit fails (every backend of the store's pool is terminated as the
// handler returns), the client has already received the messages, then gets
// Aborted; none of their rows exist, and the retry runs again at once and
// commits one set.
func TestStreamTransactional(t *testing.T) {
	const lease = 10 * time.Second
	admin := newPool(t, nil)
	app := "pgstore_test_" + randomHex(6)
	pool := faultPool(t, app, nil)
	store := newStore(t, pool, newTable(t, admin))
	svc := &faultPayments{store: store, biz: newBusiness(t, admin), tx: true}
	client := bufService(t, store, svc, idempotency.WithLease(lease))
	ctx := t.Context()

	installments := func(ctx context.Context, k string) (ids []string, replayed bool, err error) {
		stream, err := client.ChargeInstallments(ctx, &testpb.InstallmentsRequest{Account: "acct", AmountCents: 900, Currency: "EUR", Count: 3},
			idempotency.WithKey(k), idempotency.Replayed(&replayed))
		if err != nil {
			return nil, false, err
		}
		for {
			m, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return ids, replayed, nil
			}
			if err != nil {
				return ids, replayed, err
			}
			ids = append(ids, m.ChargeId)
		}
	}
	replays := func(t *testing.T, k string, want []string) {
		t.Helper()
		ids, replayed, err := installments(ctx, k)
		if err != nil || !replayed || !slices.Equal(ids, want) {
			t.Fatalf("duplicate: %v, replayed %v, charges %v; want the replay of %v", err, replayed, ids, want)
		}
		if n := svc.biz.rows(t, k); n != len(want) {
			t.Fatalf("%d business rows after the replay, want %d", n, len(want))
		}
	}

	t.Run("commits with the record", func(t *testing.T) {
		k := idempotency.NewKey()
		ids, replayed, err := installments(ctx, k)
		if err != nil || replayed || len(ids) != 3 {
			t.Fatalf("stream: %v, replayed %v, %d charges; want 3 fresh ones", err, replayed, len(ids))
		}
		if n := svc.biz.rows(t, k); n != 3 {
			t.Fatalf("%d business rows, want 3", n)
		}
		replays(t, k, ids)
		if n := svc.runsOf(k); n != 1 {
			t.Fatalf("the handler ran %d times, want 1", n)
		}
		wantConnsBack(t, pool)
	})

	t.Run("backend lost at the end", func(t *testing.T) {
		k := idempotency.NewKey()
		svc.setHook(func(ctx context.Context, key string) error {
			if key == k && svc.runsOf(k) == 1 {
				killBackends(t, admin, app)
			}
			return nil
		})
		defer svc.setHook(nil)
		warmIdle(t, pool, 3)
		ids, _, err := installments(ctx, k)
		if status.Code(err) != codes.Aborted || len(ids) != 3 {
			t.Fatalf("stream whose commit failed: %v after %d messages; want Aborted after all 3", err, len(ids))
		}
		if n := svc.biz.rows(t, k); n != 0 {
			t.Fatalf("%d business rows after Aborted, want 0", n)
		}

		// The retry, at once; the client retries Unavailable, which a
		// Reserve that meets a dead connection gives.
		start := time.Now()
		rctx, cancel := context.WithTimeout(ctx, lease/2)
		defer cancel()
		var replayed bool
		for attempt := 1; ; attempt++ {
			ids, replayed, err = installments(rctx, k)
			if status.Code(err) != codes.Unavailable || attempt == 5 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil || replayed || len(ids) != 3 {
			t.Fatalf("the retry after Aborted: %v (after %v), replayed %v, %d charges; want 3 fresh ones, well within the %v lease",
				err, time.Since(start).Round(time.Millisecond), replayed, len(ids), lease)
		}
		if n := svc.biz.rows(t, k); n != 3 {
			t.Fatalf("%d business rows after the retry, want 3", n)
		}
		if n := svc.runsOf(k); n != 2 {
			t.Fatalf("the handler ran %d times, want 2", n)
		}
		replays(t, k, ids)
	})
}

// TestBeginTxCoverage: which handlers transactional mode covers. A unary
// handler's context and a stream handler's stream.Context() carry the
// Execution, for every streaming kind; a context without it (no key, or a
// goroutine's own context.Background()) gets ErrNoExecution.
func TestBeginTxCoverage(t *testing.T) {
	_, _, store := setup(t)
	p := &coverageProbe{store: store, seen: map[string]error{}}
	client := bufService(t, store, p)
	ctx := t.Context()

	if _, err := client.Charge(ctx, &testpb.ChargeRequest{}, idempotency.WithKey(idempotency.NewKey())); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Charge(ctx, &testpb.ChargeRequest{}, idempotency.WithoutKey()); err != nil {
		t.Fatal(err)
	}
	s, err := client.ChargeInstallments(ctx, &testpb.InstallmentsRequest{Count: 1}, idempotency.WithKey(idempotency.NewKey()))
	if err != nil {
		t.Fatal(err)
	}
	for _, err := s.Recv(); err == nil; _, err = s.Recv() {
	}
	cs, err := client.ChargeBatch(ctx, idempotency.WithKey(idempotency.NewKey()))
	if err != nil {
		t.Fatal(err)
	}
	cs.Send(&testpb.ChargeRequest{})
	if _, err := cs.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	bs, err := client.ChargeInteractive(ctx, idempotency.WithKey(idempotency.NewKey()))
	if err != nil {
		t.Fatal(err)
	}
	bs.Send(&testpb.ChargeRequest{})
	bs.CloseSend()
	for _, err := bs.Recv(); err == nil; _, err = bs.Recv() {
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	for what, want := range map[string]error{
		"unary":                       nil,
		"unary without a key":         pgstore.ErrNoExecution,
		"unary, background goroutine": pgstore.ErrNoExecution,
		"server stream":               nil,
		"client stream":               nil,
		"bidi stream":                 nil,
	} {
		got, ok := p.seen[what]
		if !ok {
			t.Errorf("%s: the handler did not run", what)
		} else if !errors.Is(got, want) {
			t.Errorf("%s: BeginTx returned %v, want %v", what, got, want)
		}
	}
}

// coverageProbe records what BeginTx returns in each kind of handler; it
// writes nothing, so a transaction it begins commits empty.
type coverageProbe struct {
	testpb.UnimplementedPaymentServiceServer
	store *pgstore.Store
	mu    sync.Mutex
	seen  map[string]error
}

func (p *coverageProbe) try(ctx context.Context, what string) {
	_, err := p.store.BeginTx(ctx)
	p.mu.Lock()
	p.seen[what] = err
	p.mu.Unlock()
}

func (p *coverageProbe) Charge(ctx context.Context, _ *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	if idempotency.ExecutionFromContext(ctx) == nil {
		p.try(ctx, "unary without a key")
		return &testpb.ChargeResponse{}, nil
	}
	p.try(ctx, "unary")
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.try(context.Background(), "unary, background goroutine")
	}()
	<-done
	return &testpb.ChargeResponse{}, nil
}

func (p *coverageProbe) ChargeInstallments(_ *testpb.InstallmentsRequest, s grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
	p.try(s.Context(), "server stream")
	return s.Send(&testpb.ChargeResponse{})
}

func (p *coverageProbe) ChargeBatch(s grpc.ClientStreamingServer[testpb.ChargeRequest, testpb.BatchResponse]) error {
	for {
		if _, err := s.Recv(); err != nil {
			break
		}
	}
	p.try(s.Context(), "client stream")
	return s.SendAndClose(&testpb.BatchResponse{})
}

func (p *coverageProbe) ChargeInteractive(s grpc.BidiStreamingServer[testpb.ChargeRequest, testpb.ChargeResponse]) error {
	p.try(s.Context(), "bidi stream")
	for {
		if _, err := s.Recv(); err != nil {
			return nil
		}
		if err := s.Send(&testpb.ChargeResponse{}); err != nil {
			return err
		}
	}
}
