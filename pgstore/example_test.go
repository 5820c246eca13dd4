package pgstore_test

import (
	"context"
	"fmt"
	"log"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/pgstore"
)

func Example() {
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, "postgres://app@db:5432/app")
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	store, err := pgstore.New(ctx, pool)
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close() // before pool.Close: deferred calls run last first
	if err := store.Migrate(ctx); err != nil {
		log.Fatal(err)
	}
	idem, err := idempotency.NewServer(store)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(idem.ServerOptions()...)
	testpb.RegisterPaymentServiceServer(srv, &ledger{store: store})
	// srv.Serve(lis)
}

// ledger writes each charge in the transaction that stores the call's
// record: the charge exists if and only if its record does.
type ledger struct {
	testpb.UnimplementedPaymentServiceServer
	store *pgstore.Store
}

func (l *ledger) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	tx, err := l.store.BeginTx(ctx)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "begin: %v", err)
	}
	// No Commit, no Rollback: the interceptor's Complete commits the
	// charge with the record; Release rolls it back.
	var id string
	err = tx.QueryRow(ctx, `INSERT INTO charges (account, amount_cents, currency)
		VALUES ($1, $2, $3) RETURNING id::text`, req.Account, req.AmountCents, req.Currency).Scan(&id)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "charge: %v", err)
	}
	return &testpb.ChargeResponse{ChargeId: id, Account: req.Account, AmountCents: req.AmountCents, Currency: req.Currency}, nil
}

func ExampleSchema() {
	sql, err := pgstore.Schema("billing.idempotency_records")
	if err != nil {
		log.Fatal(err)
	}
	// Hand it to your migration tool.
	fmt.Print(sql)
	// Output:
	// CREATE TABLE IF NOT EXISTS "billing"."idempotency_records" (
	//     key         bytea       PRIMARY KEY,
	//     completed   boolean     NOT NULL DEFAULT false,
	//     token       text        NOT NULL,
	//     fingerprint bytea,
	//     record      bytea,
	//     created_at  timestamptz NOT NULL DEFAULT now(),
	//     expires_at  timestamptz NOT NULL,
	//     waiters     boolean     NOT NULL DEFAULT false
	// );
	// ALTER TABLE "billing"."idempotency_records" ADD COLUMN IF NOT EXISTS waiters boolean NOT NULL DEFAULT false;
	// CREATE INDEX IF NOT EXISTS "idempotency_records_expires_at_idx" ON "billing"."idempotency_records" (expires_at);
}
