package idempotency_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"strings"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"

	"github.com/grpcidem/idempotency/memstore"
)

// examplePayments is the payment service of the examples. Each charge gets
// the next number as its id, so that a repeated id can only be a replay.
type examplePayments struct {
	testpb.UnimplementedPaymentServiceServer
	executions atomic.Int64
	charges    atomic.Int64
}

func (p *examplePayments) charge(req interface {
	GetAccount() string
	GetAmountCents() int64
	GetCurrency() string
}, amount int64) *testpb.ChargeResponse {
	return &testpb.ChargeResponse{
		ChargeId:    fmt.Sprintf("ch_%d", p.charges.Add(1)),
		Account:     req.GetAccount(),
		AmountCents: amount,
		Currency:    req.GetCurrency(),
	}
}

func (p *examplePayments) Charge(_ context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	p.executions.Add(1)
	return p.charge(req, req.GetAmountCents()), nil
}

func (p *examplePayments) ChargeInstallments(req *testpb.InstallmentsRequest, stream grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
	p.executions.Add(1)
	if req.GetCount() <= 0 {
		return status.Error(codes.InvalidArgument, "count must be positive")
	}
	for range req.GetCount() {
		if err := stream.Send(p.charge(req, req.GetAmountCents()/int64(req.GetCount()))); err != nil {
			return err
		}
	}
	return nil
}

// startExampleServer serves srv on an in-memory connection and returns a
// client connection to it, and a function that closes both.
func startExampleServer(srv *grpc.Server, opts ...grpc.DialOption) (*grpc.ClientConn, func()) {
	lis := bufconn.Listen(1 << 20)
	go func() { _ = srv.Serve(lis) }()
	opts = append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, opts...)
	conn, err := grpc.NewClient("passthrough:///bufconn", opts...)
	if err != nil {
		panic(err)
	}
	return conn, func() {
		conn.Close()
		srv.Stop()
	}
}

func printCharges(stream grpc.ServerStreamingClient[testpb.ChargeResponse]) {
	var ids []string
	for {
		c, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			fmt.Println(err)
			return
		}
		ids = append(ids, c.GetChargeId())
	}
	fmt.Println(strings.Join(ids, " "))
}

// A server runs each payment once per idempotency key. A duplicate gets the
// stored answer, marked by the idempotency-replayed header; a key reused for
// another request is refused.
func ExampleServer() {
	store := memstore.New() // or boltstore.Open("payments-idem.db")
	defer store.Close()
	idem, err := idempotency.NewServer(store, idempotency.WithRequiredKey("*"))
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(idem.ServerOptions()...)
	svc := &examplePayments{}
	testpb.RegisterPaymentServiceServer(srv, svc)
	conn, stop := startExampleServer(srv)
	defer stop()
	client := testpb.NewPaymentServiceClient(conn)

	ctx := metadata.AppendToOutgoingContext(context.Background(), idempotency.KeyHeader, "order-1001")
	req := &testpb.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	for range 2 {
		var header metadata.MD
		resp, err := client.Charge(ctx, req, grpc.Header(&header))
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Printf("%s, replayed: %t\n", resp.GetChargeId(), idempotency.IsReplayed(header))
	}

	_, err = client.Charge(ctx, &testpb.ChargeRequest{Account: "acct_1", AmountCents: 9999, Currency: "EUR"})
	fmt.Println("same key, other amount:", status.Code(err))
	_, err = client.Charge(context.Background(), req)
	fmt.Println("no key:", status.Code(err))
	fmt.Println("executions:", svc.executions.Load())
	// Output:
	// ch_1, replayed: false
	// ch_1, replayed: true
	// same key, other amount: FailedPrecondition
	// no key: InvalidArgument
	// executions: 1
}

// A server stream's messages are recorded, and a duplicate gets the same
// messages in the same order, then the same status.
func ExampleServer_StreamServerInterceptor() {
	store := memstore.New()
	defer store.Close()
	idem, err := idempotency.NewServer(store)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(idem.UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(idem.StreamServerInterceptor()),
	)
	svc := &examplePayments{}
	testpb.RegisterPaymentServiceServer(srv, svc)
	conn, stop := startExampleServer(srv)
	defer stop()
	client := testpb.NewPaymentServiceClient(conn)

	ctx := metadata.AppendToOutgoingContext(context.Background(), idempotency.KeyHeader, "plan-7")
	req := &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 3000, Currency: "EUR", Count: 3}
	for range 2 {
		stream, err := client.ChargeInstallments(ctx, req)
		if err != nil {
			fmt.Println(err)
			return
		}
		printCharges(stream)
	}
	fmt.Println("executions:", svc.executions.Load())
	// Output:
	// ch_1 ch_2 ch_3
	// ch_1 ch_2 ch_3
	// executions: 1
}

// loseFirstAnswer stands for a network that fails once, at the worst
// moment: after the server ran the call, on the answer's way back.
func loseFirstAnswer() grpc.UnaryServerInterceptor {
	var calls atomic.Int64
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		resp, err := handler(ctx, req)
		if calls.Add(1) == 1 {
			return nil, status.Error(codes.Unavailable, "connection reset")
		}
		return resp, err
	}
}

// A client gives each call a fresh key and, with WithMaxAttempts, retries
// it with that same key, so that a payment whose answer was lost is not
// charged twice. WithKey sets a key of the application's own, such as an
// order id, that survives a restart of the client.
func ExampleUnaryClientInterceptor() {
	store := memstore.New()
	defer store.Close()
	idem, err := idempotency.NewServer(store)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(
		loseFirstAnswer(),
		idem.UnaryServerInterceptor(),
	))
	svc := &examplePayments{}
	testpb.RegisterPaymentServiceServer(srv, svc)
	conn, stop := startExampleServer(srv, grpc.WithChainUnaryInterceptor(
		idempotency.UnaryClientInterceptor(idempotency.WithMaxAttempts(3)),
	))
	defer stop()
	client := testpb.NewPaymentServiceClient(conn)

	req := &testpb.ChargeRequest{Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	var replayed bool
	var attempts int
	resp, err := client.Charge(context.Background(), req, idempotency.Replayed(&replayed), idempotency.Attempts(&attempts))
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%s after %d attempts, replayed: %t\n", resp.GetChargeId(), attempts, replayed)

	for range 2 {
		resp, err = client.Charge(context.Background(), req, idempotency.WithKey("order-1002"), idempotency.Replayed(&replayed), idempotency.Attempts(&attempts))
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Printf("%s after %d attempt, replayed: %t\n", resp.GetChargeId(), attempts, replayed)
	}
	fmt.Println("executions:", svc.executions.Load())
	// Output:
	// ch_1 after 2 attempts, replayed: true
	// ch_2 after 1 attempt, replayed: false
	// ch_2 after 1 attempt, replayed: true
	// executions: 2
}

// loseFirstStream swallows what the first stream sends and fails it after
// its handler has run.
func loseFirstStream() grpc.StreamServerInterceptor {
	var calls atomic.Int64
	return func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if calls.Add(1) > 1 {
			return handler(srv, ss)
		}
		if err := handler(srv, blackHole{ss}); err != nil {
			return err
		}
		return status.Error(codes.Unavailable, "connection reset")
	}
}

type blackHole struct{ grpc.ServerStream }

func (blackHole) SendMsg(any) error { return nil }

// A server stream that fails before its first message is opened again with
// the same key and request; the retry gets the recorded messages.
func ExampleStreamClientInterceptor() {
	store := memstore.New()
	defer store.Close()
	idem, err := idempotency.NewServer(store)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ChainStreamInterceptor(
		loseFirstStream(),
		idem.StreamServerInterceptor(),
	))
	svc := &examplePayments{}
	testpb.RegisterPaymentServiceServer(srv, svc)
	conn, stop := startExampleServer(srv, grpc.WithChainStreamInterceptor(
		idempotency.StreamClientInterceptor(idempotency.WithMaxAttempts(3)),
	))
	defer stop()
	client := testpb.NewPaymentServiceClient(conn)

	var replayed bool
	var attempts int
	req := &testpb.InstallmentsRequest{Account: "acct_1", AmountCents: 3000, Currency: "EUR", Count: 3}
	stream, err := client.ChargeInstallments(context.Background(), req, idempotency.Replayed(&replayed), idempotency.Attempts(&attempts))
	if err != nil {
		fmt.Println(err)
		return
	}
	printCharges(stream)
	fmt.Printf("after %d attempts, replayed: %t\n", attempts, replayed)
	fmt.Println("executions:", svc.executions.Load())
	// Output:
	// ch_1 ch_2 ch_3
	// after 2 attempts, replayed: true
	// executions: 1
}
