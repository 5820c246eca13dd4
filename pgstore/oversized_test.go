package pgstore_test

import (
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
)

// TestTransactionalOversizedOutcome: in transactional mode, an outcome too
// large to store still commits the handler's writes, with a status-only
// record: the caller's OK is true, and a duplicate is refused with
// FailedPrecondition instead of running the charge again. (Releasing the key
// used to roll the writes back while the caller was told OK.)
func TestTransactionalOversizedOutcome(t *testing.T) {
	pool := newPool(t, nil)
	store := newStore(t, pool, newTable(t, pool))
	svc := &faultPayments{store: store, biz: newBusiness(t, pool), tx: true}
	client := bufService(t, store, svc, idempotency.WithMaxRecordSize(10))
	ctx := t.Context()
	k := idempotency.NewKey()
	req := &testpb.ChargeRequest{Account: "acct", AmountCents: 100, Currency: "EUR"}

	if _, err := client.Charge(ctx, req, idempotency.WithKey(k)); err != nil {
		t.Fatalf("first call: %v", err)
	}
	if n := svc.biz.rows(t, k); n != 1 {
		t.Fatalf("the caller was answered OK, but %d business rows were committed, want 1", n)
	}
	var replayed bool
	_, err := client.Charge(ctx, req, idempotency.WithKey(k), idempotency.Replayed(&replayed))
	if status.Code(err) != codes.FailedPrecondition || !replayed {
		t.Fatalf("duplicate: %v (replayed %v), want FailedPrecondition saying the outcome was too large", err, replayed)
	}
	if n, runs := svc.biz.rows(t, k), svc.runsOf(k); n != 1 || runs != 1 {
		t.Fatalf("after the duplicate: %d rows, %d runs; want 1 and 1", n, runs)
	}
}
