// Package service implements the example PaymentService: a fake payment
// processor whose every execution mints fresh charge ids, so that a charge id
// seen twice proves a replay, and whose faults (a handler delay, an injected
// Unavailable) make the idempotency interceptors' work visible.
//
// The handlers follow the one rule that makes a handler safe behind the
// interceptors: commit the side effect and return OK, or commit nothing and
// return an error. An error that is not cached (Unavailable, a cancelled
// call) releases the key, so the retry runs the handler again; had the
// handler charged before failing, that retry would charge twice.
package service

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"
)

// MaxInstallments bounds ChargeInstallments' count, below the interceptors'
// default bound on a recorded stream (1024 messages), so that every valid
// request can be replayed.
const MaxInstallments = 1000

// MaxBatch bounds how many charges one ChargeBatch or ChargeInteractive call
// may make, for the same reason.
const MaxBatch = 1000

// An Option configures a Service.
type Option func(*Service)

// WithDelay makes every execution wait d before it charges, so that
// duplicates sent at the same time overlap with it. A call cancelled during
// the wait charges nothing.
func WithDelay(d time.Duration) Option {
	return func(s *Service) { s.delay = d }
}

// WithFailEvery makes every nth execution (counting every call that reaches
// the handler) fail with Unavailable before it charges anything. Unavailable
// is not cached, so a retry with the same key runs the handler again. Zero or
// less never fails.
func WithFailEvery(n int) Option {
	return func(s *Service) { s.failEvery = int64(n) }
}

// WithExecutedHook sets a function called once per execution that charged,
// on the handler's goroutine, with the handler's context (which carries the
// idempotency.Execution, and so the key) and every charge the execution made.
func WithExecutedHook(hook func(ctx context.Context, method string, charges []*paymentsv1.ChargeResponse)) Option {
	return func(s *Service) { s.hook = hook }
}

// Stats counts what the handlers did.
type Stats struct {
	// Runs is every call that reached a handler.
	Runs int64
	// Executions is every run that charged.
	Executions int64
	// Charges is how many charges the executions made.
	Charges int64
	// Injected is every run failed on purpose (WithFailEvery).
	Injected int64
}

// Service implements paymentsv1.PaymentServiceServer. It is safe for
// concurrent use.
type Service struct {
	paymentsv1.UnimplementedPaymentServiceServer

	delay     time.Duration
	failEvery int64
	hook      func(context.Context, string, []*paymentsv1.ChargeResponse)

	runs atomic.Int64 // drives WithFailEvery

	mu      sync.Mutex
	stats   map[string]*Stats                     // by full method name
	charges map[string]*paymentsv1.ChargeResponse // every charge made, by id, for GetCharge
}

// New returns a Service.
func New(opts ...Option) *Service {
	s := &Service{stats: make(map[string]*Stats), charges: make(map[string]*paymentsv1.ChargeResponse)}
	for _, opt := range opts {
		opt(s)
	}
	return s
}

// Stats returns the counts of every method together.
func (s *Service) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	var t Stats
	for _, m := range s.stats {
		t.Runs += m.Runs
		t.Executions += m.Executions
		t.Charges += m.Charges
		t.Injected += m.Injected
	}
	return t
}

// StatsOf returns the counts of one method, by its full name
// (paymentsv1.PaymentService_Charge_FullMethodName and the like).
func (s *Service) StatsOf(fullMethod string) Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m := s.stats[fullMethod]; m != nil {
		return *m
	}
	return Stats{}
}

func (s *Service) count(method string, f func(*Stats)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.stats[method]
	if m == nil {
		m = new(Stats)
		s.stats[method] = m
	}
	f(m)
}

// begin counts a run, injects the configured failure and waits the
// configured delay. An error from it means: charge nothing, return it.
func (s *Service) begin(ctx context.Context, method string) error {
	n := s.runs.Add(1)
	injected := s.failEvery > 0 && n%s.failEvery == 0
	s.count(method, func(m *Stats) {
		m.Runs++
		if injected {
			m.Injected++
		}
	})
	if injected {
		return status.Errorf(codes.Unavailable, "injected failure: every execution number %d fails (-fail-every); nothing was charged, retry with the same idempotency key", s.failEvery)
	}
	if s.delay <= 0 {
		return nil
	}
	t := time.NewTimer(s.delay)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	}
}

// executed counts an execution that charged.
func (s *Service) executed(ctx context.Context, method string, charges []*paymentsv1.ChargeResponse) {
	s.count(method, func(m *Stats) {
		m.Executions++
		m.Charges += int64(len(charges))
	})
	s.remember(charges...)
	if s.hook != nil {
		s.hook(ctx, method, charges)
	}
}

// remember keeps charges for GetCharge. The example keeps every charge it
// makes in memory; a real service reads its ledger.
func (s *Service) remember(charges ...*paymentsv1.ChargeResponse) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range charges {
		s.charges[c.GetChargeId()] = c
	}
}

// GetCharge returns a charge this service made, or NotFound. It only
// reads: its proto declares it NO_SIDE_EFFECTS, so the interceptors give it
// no key and store nothing for it. It counts as a run of its method, never
// as an execution, and neither waits nor fails on purpose.
func (s *Service) GetCharge(_ context.Context, req *paymentsv1.GetChargeRequest) (*paymentsv1.ChargeResponse, error) {
	s.count(paymentsv1.PaymentService_GetCharge_FullMethodName, func(m *Stats) { m.Runs++ })
	if req.GetChargeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "charge_id is empty")
	}
	s.mu.Lock()
	c := s.charges[req.GetChargeId()]
	s.mu.Unlock()
	if c == nil {
		return nil, status.Errorf(codes.NotFound, "no charge %s was made by this server", req.GetChargeId())
	}
	return proto.Clone(c).(*paymentsv1.ChargeResponse), nil
}

// Validate reports whether a charge request can be charged: an account and
// a positive amount. Its error is an InvalidArgument status.
func Validate(account string, amountCents int64) error {
	if account == "" {
		return status.Error(codes.InvalidArgument, "account is empty")
	}
	if amountCents <= 0 {
		return status.Errorf(codes.InvalidArgument, "amount_cents is %d; it must be positive", amountCents)
	}
	return nil
}

// newChargeID returns a fresh random charge id: two executions never share
// one, so a repeated id can only come from a replay.
func newChargeID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return "ch_" + hex.EncodeToString(b[:])
}

func charge(account string, amountCents int64, currency string) *paymentsv1.ChargeResponse {
	return &paymentsv1.ChargeResponse{ChargeId: newChargeID(), Account: account, AmountCents: amountCents, Currency: currency}
}

// Charge makes one charge.
func (s *Service) Charge(ctx context.Context, req *paymentsv1.ChargeRequest) (*paymentsv1.ChargeResponse, error) {
	const method = paymentsv1.PaymentService_Charge_FullMethodName
	if err := s.begin(ctx, method); err != nil {
		return nil, err
	}
	if err := Validate(req.GetAccount(), req.GetAmountCents()); err != nil {
		return nil, err
	}
	c := charge(req.GetAccount(), req.GetAmountCents(), req.GetCurrency())
	s.executed(ctx, method, []*paymentsv1.ChargeResponse{c})
	return c, nil
}

// Split divides amountCents into count installments that differ by at most
// one cent and add up to amountCents; the larger ones come first.
func Split(amountCents int64, count int) []int64 {
	parts := make([]int64, count)
	for i := range parts {
		parts[i] = amountCents / int64(count)
		if int64(i) < amountCents%int64(count) {
			parts[i]++
		}
	}
	return parts
}

// ChargeInstallments splits the amount into count charges of at least one
// cent each and streams them back.
func (s *Service) ChargeInstallments(req *paymentsv1.InstallmentsRequest, stream grpc.ServerStreamingServer[paymentsv1.ChargeResponse]) error {
	const method = paymentsv1.PaymentService_ChargeInstallments_FullMethodName
	ctx := stream.Context()
	if err := s.begin(ctx, method); err != nil {
		return err
	}
	if err := Validate(req.GetAccount(), req.GetAmountCents()); err != nil {
		return err
	}
	count := req.GetCount()
	if count <= 0 || count > MaxInstallments {
		return status.Errorf(codes.InvalidArgument, "count is %d; it must be between 1 and %d", count, MaxInstallments)
	}
	if int64(count) > req.GetAmountCents() {
		return status.Errorf(codes.InvalidArgument, "count %d is more than amount_cents %d; every installment must be at least one cent", count, req.GetAmountCents())
	}
	charges := make([]*paymentsv1.ChargeResponse, 0, count)
	for _, part := range Split(req.GetAmountCents(), int(count)) {
		charges = append(charges, charge(req.GetAccount(), part, req.GetCurrency()))
	}
	// The charges are committed before the first is sent: a stream that
	// breaks half way must not leave half a payment behind.
	s.executed(ctx, method, charges)
	for _, c := range charges {
		if err := stream.Send(c); err != nil {
			return err
		}
	}
	return nil
}

// ChargeBatch reads every request, checks them all, and only then charges
// them all: one invalid request charges nothing.
func (s *Service) ChargeBatch(stream grpc.ClientStreamingServer[paymentsv1.ChargeRequest, paymentsv1.BatchResponse]) error {
	const method = paymentsv1.PaymentService_ChargeBatch_FullMethodName
	ctx := stream.Context()
	if err := s.begin(ctx, method); err != nil {
		return err
	}
	var reqs []*paymentsv1.ChargeRequest
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if len(reqs) == MaxBatch {
			return status.Errorf(codes.InvalidArgument, "a batch holds at most %d charges", MaxBatch)
		}
		if err := Validate(req.GetAccount(), req.GetAmountCents()); err != nil {
			return status.Errorf(codes.InvalidArgument, "charge %d of the batch: %s", len(reqs)+1, status.Convert(err).Message())
		}
		reqs = append(reqs, req)
	}
	if len(reqs) == 0 {
		return status.Error(codes.InvalidArgument, "the batch is empty; send at least one charge")
	}
	resp := &paymentsv1.BatchResponse{}
	for _, req := range reqs {
		resp.Charges = append(resp.Charges, charge(req.GetAccount(), req.GetAmountCents(), req.GetCurrency()))
	}
	s.executed(ctx, method, resp.Charges)
	return stream.SendAndClose(resp)
}

// ChargeInteractive answers each request with its charge as it arrives. An
// invalid request ends the stream with InvalidArgument, after the charges
// already answered. Each answered charge is made: a stream that breaks off
// half way has charged, yet the interceptor releases its key, so a retry
// charges again. Bidirectional handlers with per-message side effects need
// clients that finish their streams; Stats shows it when they do not.
func (s *Service) ChargeInteractive(stream grpc.BidiStreamingServer[paymentsv1.ChargeRequest, paymentsv1.ChargeResponse]) error {
	const method = paymentsv1.PaymentService_ChargeInteractive_FullMethodName
	ctx := stream.Context()
	if err := s.begin(ctx, method); err != nil {
		return err
	}
	var charges []*paymentsv1.ChargeResponse
	defer func() {
		if len(charges) > 0 {
			s.executed(ctx, method, charges)
		}
	}()
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if len(charges) == MaxBatch {
			return status.Errorf(codes.InvalidArgument, "one stream makes at most %d charges", MaxBatch)
		}
		if err := Validate(req.GetAccount(), req.GetAmountCents()); err != nil {
			return status.Errorf(codes.InvalidArgument, "charge %d of the stream: %s", len(charges)+1, status.Convert(err).Message())
		}
		c := charge(req.GetAccount(), req.GetAmountCents(), req.GetCurrency())
		if err := stream.Send(c); err != nil {
			return err
		}
		s.remember(c) // made once answered, whatever the stream does next
		charges = append(charges, c)
	}
}
