package pgstore_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/pgstore"
)

// faultPayments is the service of the fault tests. It counts executions per
// idempotency key and how many run at once, remembers the charge each
// execution answered, and, with tx set, writes one business row per charge
// in the call's transaction (BeginTx), tagged with the key. Its hook, if
// set, runs after the writes, before the handler answers.
type faultPayments struct {
	testpb.UnimplementedPaymentServiceServer
	store *pgstore.Store
	biz   business
	tx    bool

	inFlight, maxInFlight atomic.Int64
	mu                    sync.Mutex
	runs                  map[string]int      // per key
	answers               map[string][]string // per key: the charges of each execution
	hook                  func(ctx context.Context, key string) error
}

func (p *faultPayments) setHook(h func(ctx context.Context, key string) error) {
	p.mu.Lock()
	p.hook = h
	p.mu.Unlock()
}

// enter counts an execution of key; the returned function ends it.
func (p *faultPayments) enter(key string) (leave func()) {
	n := p.inFlight.Add(1)
	for {
		m := p.maxInFlight.Load()
		if n <= m || p.maxInFlight.CompareAndSwap(m, n) {
			break
		}
	}
	p.mu.Lock()
	if p.runs == nil {
		p.runs, p.answers = map[string]int{}, map[string][]string{}
	}
	p.runs[key]++
	p.mu.Unlock()
	return func() { p.inFlight.Add(-1) }
}

// runsOf returns how many times the handler ran for key.
func (p *faultPayments) runsOf(key string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.runs[key]
}

func (p *faultPayments) answered(key, charge string) {
	p.mu.Lock()
	p.answers[key] = append(p.answers[key], charge)
	p.mu.Unlock()
}

func (p *faultPayments) runHook(ctx context.Context, key string) error {
	p.mu.Lock()
	h := p.hook
	p.mu.Unlock()
	if h == nil {
		return nil
	}
	return h(ctx, key)
}

func keyOf(ctx context.Context) string {
	if e := idempotency.ExecutionFromContext(ctx); e != nil {
		return e.Key
	}
	return ""
}

func (p *faultPayments) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	k := keyOf(ctx)
	defer p.enter(k)()
	id := "ch_" + randomHex(8)
	if p.tx {
		tx, err := p.store.BeginTx(ctx)
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "begin: %v", err)
		}
		if _, err := tx.Exec(ctx, "INSERT INTO "+p.biz.ident()+" (charge, idem_key) VALUES ($1, $2)", id, k); err != nil {
			return nil, status.Errorf(codes.Unavailable, "insert: %v", err)
		}
	}
	if err := p.runHook(ctx, k); err != nil {
		return nil, err
	}
	p.answered(k, id)
	return &testpb.ChargeResponse{ChargeId: id, Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}, nil
}

// ChargeInstallments writes and sends one charge per installment, in the
// call's transaction: the messages go out as the rows are written, and the
// rows commit with the record, after the last message.
func (p *faultPayments) ChargeInstallments(req *testpb.InstallmentsRequest, stream grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
	ctx := stream.Context()
	k := keyOf(ctx)
	defer p.enter(k)()
	tx, err := p.store.BeginTx(ctx)
	if err != nil {
		return status.Errorf(codes.Unavailable, "begin: %v", err)
	}
	for i := range req.Count {
		id := fmt.Sprintf("ch_%s_%d", randomHex(6), i)
		if _, err := tx.Exec(ctx, "INSERT INTO "+p.biz.ident()+" (charge, idem_key) VALUES ($1, $2)", id, k); err != nil {
			return status.Errorf(codes.Unavailable, "insert: %v", err)
		}
		if err := stream.Send(&testpb.ChargeResponse{ChargeId: id, Account: req.Account, AmountCents: req.AmountCents / int64(req.Count), Currency: req.Currency}); err != nil {
			return err
		}
		p.answered(k, id)
	}
	return p.runHook(ctx, k)
}
