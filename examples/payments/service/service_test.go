package service_test

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency/examples/payments/service"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"
)

// serve runs svc on an in-memory connection, without interceptors: these
// tests are about the service alone.
func serve(t *testing.T, svc *service.Service) paymentsv1.PaymentServiceClient {
	t.Helper()
	c, _ := serveAndStop(t, svc)
	return c
}

func serveAndStop(t *testing.T, svc *service.Service) (paymentsv1.PaymentServiceClient, *grpc.Server) {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer()
	paymentsv1.RegisterPaymentServiceServer(srv, svc)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	cc, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { cc.Close() })
	return paymentsv1.NewPaymentServiceClient(cc), srv
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func ids(cs []*paymentsv1.ChargeResponse) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.GetChargeId())
	}
	return out
}

func TestChargeMintsAFreshIDPerExecution(t *testing.T) {
	svc := service.New()
	c := serve(t, svc)
	ctx := testCtx(t)
	req := &paymentsv1.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	a, err := c.Charge(ctx, req)
	require.NoError(t, err)
	b, err := c.Charge(ctx, req)
	require.NoError(t, err)
	require.NotEqual(t, a.GetChargeId(), b.GetChargeId())
	require.Regexp(t, `^ch_[0-9a-f]{24}$`, a.GetChargeId())
	require.Equal(t, "acct_1", a.GetAccount())
	require.EqualValues(t, 1250, a.GetAmountCents())
	require.Equal(t, "EUR", a.GetCurrency())
	require.Equal(t, service.Stats{Runs: 2, Executions: 2, Charges: 2}, svc.Stats())
}

func TestInvalidRequestsChargeNothing(t *testing.T) {
	svc := service.New()
	c := serve(t, svc)
	ctx := testCtx(t)
	for _, req := range []*paymentsv1.ChargeRequest{
		{Account: "", AmountCents: 100},
		{Account: "acct_1", AmountCents: 0},
		{Account: "acct_1", AmountCents: -5},
	} {
		_, err := c.Charge(ctx, req)
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", req)
	}
	for _, req := range []*paymentsv1.InstallmentsRequest{
		{Account: "acct_1", AmountCents: 100, Count: 0},
		{Account: "acct_1", AmountCents: 100, Count: -1},
		{Account: "acct_1", AmountCents: 2, Count: 3},
		{Account: "acct_1", AmountCents: 1 << 40, Count: service.MaxInstallments + 1},
		{Account: "", AmountCents: 100, Count: 2},
	} {
		stream, err := c.ChargeInstallments(ctx, req)
		require.NoError(t, err)
		_, err = stream.Recv()
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", req)
	}
	require.Equal(t, service.Stats{Runs: 8}, svc.Stats())
}

func TestInstallmentsSplitTheAmount(t *testing.T) {
	svc := service.New()
	c := serve(t, svc)
	stream, err := c.ChargeInstallments(testCtx(t), &paymentsv1.InstallmentsRequest{Account: "acct_1", AmountCents: 1000, Currency: "EUR", Count: 3})
	require.NoError(t, err)
	var amounts []int64
	seen := map[string]bool{}
	for {
		ch, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		amounts = append(amounts, ch.GetAmountCents())
		require.False(t, seen[ch.GetChargeId()])
		seen[ch.GetChargeId()] = true
	}
	require.Equal(t, []int64{334, 333, 333}, amounts)
	require.Equal(t, service.Stats{Runs: 1, Executions: 1, Charges: 3}, svc.StatsOf(paymentsv1.PaymentService_ChargeInstallments_FullMethodName))
}

func TestSplit(t *testing.T) {
	require.Equal(t, []int64{5}, service.Split(5, 1))
	require.Equal(t, []int64{2, 2, 1}, service.Split(5, 3))
	require.Equal(t, []int64{1, 1, 1, 1, 1}, service.Split(5, 5))
}

func TestBatchIsAllOrNothing(t *testing.T) {
	svc := service.New()
	c := serve(t, svc)
	ctx := testCtx(t)

	send := func(reqs ...*paymentsv1.ChargeRequest) (*paymentsv1.BatchResponse, error) {
		stream, err := c.ChargeBatch(ctx)
		require.NoError(t, err)
		for _, r := range reqs {
			if err := stream.Send(r); err != nil {
				break
			}
		}
		return stream.CloseAndRecv()
	}
	resp, err := send(&paymentsv1.ChargeRequest{Account: "a", AmountCents: 1}, &paymentsv1.ChargeRequest{Account: "b", AmountCents: 2})
	require.NoError(t, err)
	require.Len(t, resp.GetCharges(), 2)
	require.Equal(t, "b", resp.GetCharges()[1].GetAccount())

	_, err = send(&paymentsv1.ChargeRequest{Account: "a", AmountCents: 1}, &paymentsv1.ChargeRequest{Account: "b", AmountCents: 0})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "charge 2 of the batch")
	_, err = send()
	require.Equal(t, codes.InvalidArgument, status.Code(err), "an empty batch")

	require.Equal(t, service.Stats{Runs: 3, Executions: 1, Charges: 2}, svc.Stats(), "the invalid batch charged nothing")
}

func TestInteractiveAnswersEachRequest(t *testing.T) {
	var mu sync.Mutex
	var hooked [][]string
	svc := service.New(service.WithExecutedHook(func(_ context.Context, method string, cs []*paymentsv1.ChargeResponse) {
		require.Equal(t, paymentsv1.PaymentService_ChargeInteractive_FullMethodName, method)
		mu.Lock()
		hooked = append(hooked, ids(cs))
		mu.Unlock()
	}))
	c := serve(t, svc)
	ctx := testCtx(t)

	stream, err := c.ChargeInteractive(ctx)
	require.NoError(t, err)
	var got []*paymentsv1.ChargeResponse
	for i := range 3 {
		require.NoError(t, stream.Send(&paymentsv1.ChargeRequest{Account: "a", AmountCents: int64(i + 1)}))
		ch, err := stream.Recv()
		require.NoError(t, err, "each request is answered before the next is sent")
		require.EqualValues(t, i+1, ch.GetAmountCents())
		got = append(got, ch)
	}
	require.NoError(t, stream.CloseSend())
	_, err = stream.Recv()
	require.ErrorIs(t, err, io.EOF)

	// An invalid request ends the stream after the charges already made.
	stream, err = c.ChargeInteractive(ctx)
	require.NoError(t, err)
	require.NoError(t, stream.Send(&paymentsv1.ChargeRequest{Account: "a", AmountCents: 7}))
	_, err = stream.Recv()
	require.NoError(t, err)
	require.NoError(t, stream.Send(&paymentsv1.ChargeRequest{Account: "", AmountCents: 7}))
	_, err = stream.Recv()
	require.Equal(t, codes.InvalidArgument, status.Code(err))

	mu.Lock()
	defer mu.Unlock()
	require.Len(t, hooked, 2)
	require.Equal(t, ids(got), hooked[0])
	require.Len(t, hooked[1], 1)
	require.Equal(t, service.Stats{Runs: 2, Executions: 2, Charges: 4}, svc.Stats())
}

func TestFailEveryInjectsUnavailable(t *testing.T) {
	svc := service.New(service.WithFailEvery(3))
	c := serve(t, svc)
	ctx := testCtx(t)
	var codesSeen []codes.Code
	for range 6 {
		_, err := c.Charge(ctx, &paymentsv1.ChargeRequest{Account: "a", AmountCents: 1})
		codesSeen = append(codesSeen, status.Code(err))
	}
	require.Equal(t, []codes.Code{codes.OK, codes.OK, codes.Unavailable, codes.OK, codes.OK, codes.Unavailable}, codesSeen)
	require.Equal(t, service.Stats{Runs: 6, Executions: 4, Charges: 4, Injected: 2}, svc.Stats())
}

func TestCancelledDuringDelayChargesNothing(t *testing.T) {
	svc := service.New(service.WithDelay(time.Hour))
	c, srv := serveAndStop(t, svc)
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() {
		_, err := c.Charge(ctx, &paymentsv1.ChargeRequest{Account: "a", AmountCents: 1})
		done <- err
	}()
	require.Eventually(t, func() bool { return svc.Stats().Runs == 1 }, time.Minute, time.Millisecond, "the handler never started")
	cancel()
	require.Equal(t, codes.Canceled, status.Code(<-done))
	// GracefulStop waits for the handler, which returns only because it
	// watches its context (the delay is an hour).
	srv.GracefulStop()
	require.Equal(t, service.Stats{Runs: 1}, svc.Stats())
}

func TestGetChargeReturnsChargesMade(t *testing.T) {
	svc := service.New()
	c := serve(t, svc)
	ctx := testCtx(t)
	made, err := c.Charge(ctx, &paymentsv1.ChargeRequest{Account: "acct_1", AmountCents: 100, Currency: "EUR"})
	require.NoError(t, err)
	stream, err := c.ChargeInteractive(ctx)
	require.NoError(t, err)
	require.NoError(t, stream.Send(&paymentsv1.ChargeRequest{Account: "acct_2", AmountCents: 200}))
	answered, err := stream.Recv()
	require.NoError(t, err)

	for _, want := range []*paymentsv1.ChargeResponse{made, answered} {
		got, err := c.GetCharge(ctx, &paymentsv1.GetChargeRequest{ChargeId: want.GetChargeId()})
		require.NoError(t, err)
		require.True(t, proto.Equal(want, got), "an answered charge is made, even while its stream runs")
	}
	require.NoError(t, stream.CloseSend())
	_, err = stream.Recv()
	require.ErrorIs(t, err, io.EOF)

	_, err = c.GetCharge(ctx, &paymentsv1.GetChargeRequest{ChargeId: "ch_000000000000000000000000"})
	require.Equal(t, codes.NotFound, status.Code(err))
	_, err = c.GetCharge(ctx, &paymentsv1.GetChargeRequest{})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	st := svc.StatsOf(paymentsv1.PaymentService_GetCharge_FullMethodName)
	require.Equal(t, service.Stats{Runs: 4}, st, "reads are runs, never executions")
}
