package payments_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"
	"github.com/grpcidem/idempotency/internal/tmpfs"
)

// The example server's health service reports NOT_SERVING while its bbolt
// file cannot take writes (the disk is full), and SERVING again once it can.
func TestServerHealthFollowsTheStore(t *testing.T) {
	dir := tmpfs.Mount(t, "4m")
	srv := startServer(t, "-store", "bolt", "-db", filepath.Join(dir, "idem.db"))
	conn := dial(t, srv.addr)
	health, client := healthpb.NewHealthClient(conn), paymentsv1.NewPaymentServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	waitFor := func(want healthpb.HealthCheckResponse_ServingStatus, within time.Duration) {
		t.Helper()
		deadline := time.Now().Add(within)
		for {
			resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: paymentsv1.PaymentService_ServiceDesc.ServiceName})
			require.NoError(t, err)
			if resp.Status == want {
				return
			}
			require.True(t, time.Now().Before(deadline), "health is %v, want %v\nstderr:\n%s", resp.Status, want, srv.errOut)
			time.Sleep(50 * time.Millisecond)
		}
	}
	charge := func(key, account string) error {
		kctx := metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, key)
		_, err := client.Charge(kctx, &paymentsv1.ChargeRequest{Account: account, AmountCents: 100, Currency: "EUR"})
		return err
	}
	waitFor(healthpb.HealthCheckResponse_SERVING, 10*time.Second)
	require.NoError(t, charge("before", "acct_1"))

	filler := filepath.Join(dir, "filler")
	tmpfs.Fill(t, filler)
	// Its record needs pages the full disk cannot give: the commit fails,
	// and the server retries it until the store timeout, or until the
	// disk has room again.
	unsaved := make(chan error, 1)
	go func() { unsaved <- charge("unsaved", strings.Repeat("a", 512<<10)) }()
	waitFor(healthpb.HealthCheckResponse_NOT_SERVING, 10*time.Second)
	require.Equal(t, codes.Unavailable, status.Code(charge("refused", "acct_2")))

	require.NoError(t, os.Remove(filler))
	waitFor(healthpb.HealthCheckResponse_SERVING, 15*time.Second)
	require.NoError(t, <-unsaved, "the caller gets the handler's real outcome")
	require.NoError(t, charge("after", "acct_3"))
	srv.stop(t)
}
