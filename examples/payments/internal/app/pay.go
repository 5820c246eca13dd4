package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/examples/payments/service"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"
)

// Modes are the ways to pay, one per RPC kind.
var Modes = []string{"unary", "installments", "batch", "interactive"}

// methodOf maps a mode to the RPC it calls.
var methodOf = map[string]string{
	"unary":        paymentsv1.PaymentService_Charge_FullMethodName,
	"installments": paymentsv1.PaymentService_ChargeInstallments_FullMethodName,
	"batch":        paymentsv1.PaymentService_ChargeBatch_FullMethodName,
	"interactive":  paymentsv1.PaymentService_ChargeInteractive_FullMethodName,
}

// A Payment is one logical payment: one key, however many attempts it
// takes. Installments, batch and interactive payments charge AmountCents in
// Parts charges.
type Payment struct {
	Mode        string
	Key         string
	Account     string
	AmountCents int64
	Currency    string
	Parts       int
}

// A Receipt is what a payment got back.
type Receipt struct {
	Charges []*paymentsv1.ChargeResponse
	// Replayed says the answer came from the store, not from running the
	// handler.
	Replayed bool
	// Attempts counts every call sent for the payment.
	Attempts int
}

// ChargeIDs lists the receipt's charge ids in order.
func (r Receipt) ChargeIDs() []string {
	ids := make([]string, len(r.Charges))
	for i, c := range r.Charges {
		ids[i] = c.GetChargeId()
	}
	return ids
}

// payer pays over a connection whose client interceptors retry unary calls
// and server streams. Client and bidirectional streams cannot be retried by
// an interceptor (their requests are gone once sent), so payer retries them
// itself, with the same key: the same loop, one level up.
type payer struct {
	client      paymentsv1.PaymentServiceClient
	maxAttempts int
	backoff     time.Duration // bound of the first retry's sleep; doubles up to maxBackoff
	maxBackoff  time.Duration
}

func newPayer(cc grpc.ClientConnInterface, maxAttempts int, backoff, maxBackoff time.Duration) *payer {
	return &payer{client: paymentsv1.NewPaymentServiceClient(cc), maxAttempts: max(1, maxAttempts), backoff: backoff, maxBackoff: maxBackoff}
}

// pay makes one payment, retrying with its key while the failure is
// retryable, up to maxAttempts calls in all.
func (p *payer) pay(ctx context.Context, pm Payment) (Receipt, error) {
	if _, ok := methodOf[pm.Mode]; !ok {
		return Receipt{}, fmt.Errorf("unknown mode %q", pm.Mode)
	}
	var rc Receipt
	for try := 1; ; try++ {
		left := p.maxAttempts - rc.Attempts
		var attempts int
		opts := []grpc.CallOption{
			idempotency.WithKey(pm.Key),
			idempotency.WithMaxAttempts(left),
			idempotency.Replayed(&rc.Replayed),
			idempotency.Attempts(&attempts),
		}
		var err error
		rc.Charges, err = p.once(ctx, pm, opts)
		rc.Attempts += attempts
		if err == nil || pm.Mode == "unary" || rc.Attempts >= p.maxAttempts || !retryable(err) || !p.sleep(ctx, try) {
			return rc, err
		}
	}
}

func retryable(err error) bool {
	return slices.Contains(idempotency.DefaultRetryCodes, status.Code(err))
}

// sleep waits before retry n with full jitter, as the interceptor does.
func (p *payer) sleep(ctx context.Context, n int) bool {
	bound := p.backoff
	for i := 1; i < n && bound < p.maxBackoff; i++ {
		bound *= 2
	}
	bound = min(bound, p.maxBackoff)
	t := time.NewTimer(rand.N(bound + 1))
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// once makes one try of a payment: one call (which the interceptor may
// retry, for unary calls and server streams).
func (p *payer) once(ctx context.Context, pm Payment, opts []grpc.CallOption) ([]*paymentsv1.ChargeResponse, error) {
	// A try that fails half way leaves its stream open; ending the context
	// closes it.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	switch pm.Mode {
	case "unary":
		c, err := p.client.Charge(ctx, &paymentsv1.ChargeRequest{Account: pm.Account, AmountCents: pm.AmountCents, Currency: pm.Currency}, opts...)
		if err != nil {
			return nil, err
		}
		return []*paymentsv1.ChargeResponse{c}, nil
	case "installments":
		stream, err := p.client.ChargeInstallments(ctx, &paymentsv1.InstallmentsRequest{Account: pm.Account, AmountCents: pm.AmountCents, Currency: pm.Currency, Count: int32(pm.Parts)}, opts...)
		if err != nil {
			return nil, err
		}
		var charges []*paymentsv1.ChargeResponse
		for {
			c, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return charges, nil
			}
			if err != nil {
				return nil, err
			}
			charges = append(charges, c)
		}
	case "batch":
		stream, err := p.client.ChargeBatch(ctx, opts...)
		if err != nil {
			return nil, err
		}
		for _, req := range parts(pm) {
			// A send fails with io.EOF when the server has ended the
			// stream; CloseAndRecv returns why.
			if err := stream.Send(req); err != nil {
				break
			}
		}
		resp, err := stream.CloseAndRecv()
		if err != nil {
			return nil, err
		}
		return resp.GetCharges(), nil
	case "interactive":
		stream, err := p.client.ChargeInteractive(ctx, opts...)
		if err != nil {
			return nil, err
		}
		var charges []*paymentsv1.ChargeResponse
		for _, req := range parts(pm) {
			if err := stream.Send(req); err != nil {
				break
			}
			c, err := stream.Recv()
			if err != nil {
				return nil, err
			}
			charges = append(charges, c)
		}
		if err := stream.CloseSend(); err != nil {
			return nil, err
		}
		// The stream's status comes with the end of the answers.
		for {
			c, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return charges, nil
			}
			if err != nil {
				return nil, err
			}
			charges = append(charges, c)
		}
	}
	return nil, fmt.Errorf("unknown mode %q", pm.Mode)
}

// parts splits a batch or interactive payment into its charge requests.
func parts(pm Payment) []*paymentsv1.ChargeRequest {
	n := max(1, pm.Parts)
	if pm.AmountCents < int64(n) {
		// Too small to split into whole cents: send it whole, and let the
		// server judge the amount.
		n = 1
	}
	var reqs []*paymentsv1.ChargeRequest
	for _, amount := range service.Split(pm.AmountCents, n) {
		reqs = append(reqs, &paymentsv1.ChargeRequest{Account: pm.Account, AmountCents: amount, Currency: pm.Currency})
	}
	return reqs
}
