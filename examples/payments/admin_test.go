package payments_test

import (
	"context"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/examples/payments/internal/app"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

var adminRE = regexp.MustCompile(`admin service listening on (\S+)\n`)

// With -admin, the server serves the admin service on a listener of its
// own, to callers with its token only; forgetting a key there makes the
// next call with the key charge again.
func TestAdminService(t *testing.T) {
	t.Setenv("ADMIN_TOKEN", "s3cret")
	srv := startServer(t, "-store", "memory", "-admin", "127.0.0.1:0")
	m := adminRE.FindStringSubmatch(srv.out.String())
	require.NotNil(t, m, "no admin address in the server's output:\n%s", srv.out)
	admin := idempotencyv1.NewAdminClient(dial(t, m[1]))
	payments := paymentsv1.NewPaymentServiceClient(dial(t, srv.addr))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	for _, auth := range []string{"", "Bearer wrong", "s3cret"} {
		actx := ctx
		if auth != "" {
			actx = metadata.AppendToOutgoingContext(ctx, "authorization", auth)
		}
		_, err := admin.Stats(actx, &idempotencyv1.StatsRequest{})
		require.Equal(t, codes.Unauthenticated, status.Code(err), "authorization %q: %v", auth, err)
	}
	actx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer s3cret")

	req := &paymentsv1.ChargeRequest{Account: "acct_1", AmountCents: 100, Currency: "EUR"}
	kctx := metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, "order-admin-1")
	first, err := payments.Charge(kctx, req)
	require.NoError(t, err)
	again, err := payments.Charge(kctx, req)
	require.NoError(t, err)
	require.Equal(t, first.GetChargeId(), again.GetChargeId(), "replayed")

	rec, err := admin.GetRecord(actx, &idempotencyv1.GetRecordRequest{Scope: []byte("public"), Key: []byte("order-admin-1")})
	require.NoError(t, err)
	require.Equal(t, "/payments.v1.PaymentService/Charge", rec.GetRecord().GetMethod())
	_, err = admin.ForgetRecord(actx, &idempotencyv1.ForgetRecordRequest{Scope: []byte("public"), Key: []byte("order-admin-1")})
	require.NoError(t, err)
	third, err := payments.Charge(kctx, req)
	require.NoError(t, err)
	require.NotEqual(t, first.GetChargeId(), third.GetChargeId(), "charged again after forget")

	stats, err := admin.Stats(actx, &idempotencyv1.StatsRequest{})
	require.NoError(t, err)
	require.Equal(t, "memory", stats.GetStore())
}

func TestAdminNeedsAToken(t *testing.T) {
	t.Setenv("ADMIN_TOKEN", "")
	var out, errOut syncBuffer
	err := app.RunServer(context.Background(), []string{"-addr", "127.0.0.1:0", "-store", "memory", "-admin", "127.0.0.1:0"}, &out, &errOut)
	require.ErrorContains(t, err, "-admin needs a token")
}
