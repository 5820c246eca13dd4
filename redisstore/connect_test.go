package redisstore_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"connectrpc.com/connect"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/idemconnect"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/internal/testpb/testpbconnect"
)

// connectPayments serves paymentServer's Charge as a connect handler, as a
// team moving a gRPC service to connect-go would for a while.
type connectPayments struct {
	testpbconnect.UnimplementedPaymentServiceHandler
	p *paymentServer
}

func (c connectPayments) Charge(ctx context.Context, req *connect.Request[testpb.ChargeRequest]) (*connect.Response[testpb.ChargeResponse], error) {
	resp, err := c.p.Charge(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

// TestGRPCAndConnectReplicasShareTheStore: a grpc-go replica and a connect
// replica, each with its own Redis connections, take duplicates of the same
// keys at the same time. Each key runs once, whichever replica gets it
// first; every duplicate on either replica gets that execution's charge and
// header, woken across adapters by the store's notifications.
func TestGRPCAndConnectReplicasShareTheStore(t *testing.T) {
	b := newBank()
	prefix := testPrefix(t, newClient(t))
	opts := []idempotency.Option{idempotency.WithLogger(nil)}

	gsrv := mustServer(newStore(t, newClient(t), prefix, noRecheck), opts...)
	gs := grpc.NewServer(gsrv.ServerOptions()...)
	testpb.RegisterPaymentServiceServer(gs, &paymentServer{replica: 0, bank: b})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	grpcClient := testpb.NewPaymentServiceClient(conn)

	csrv := mustServer(newStore(t, newClient(t), prefix, noRecheck), opts...)
	mux := http.NewServeMux()
	mux.Handle(testpbconnect.NewPaymentServiceHandler(connectPayments{p: &paymentServer{replica: 1, bank: b}},
		connect.WithInterceptors(idemconnect.NewInterceptor(csrv))))
	hs := httptest.NewServer(mux)
	t.Cleanup(hs.Close)
	connectClient := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL)

	type answer struct {
		chargeID, chargedBy string
		replayed            bool
	}
	const keys, dups = 30, 6
	answers := make([][]answer, keys)
	var wg sync.WaitGroup
	var mu sync.Mutex
	for k := range keys {
		key := fmt.Sprintf("mixed-%d", k)
		for d := range dups {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), eventually)
				defer cancel()
				var a answer
				if (k+d)%2 == 0 {
					r := chargeVia(ctx, grpcClient, key, key)
					if !assert.NoError(t, r.err) {
						return
					}
					a = answer{r.resp.ChargeId, r.header.Get("charged-by")[0], r.replayed}
				} else {
					req := connect.NewRequest(&testpb.ChargeRequest{Account: key, AmountCents: 1250, Currency: "EUR"})
					req.Header().Set(idemconnect.KeyHeader, key)
					resp, err := connectClient.Charge(ctx, req)
					if !assert.NoError(t, err) {
						return
					}
					a = answer{resp.Msg.ChargeId, resp.Header().Get("Charged-By"), idemconnect.IsReplayed(resp.Header())}
				}
				mu.Lock()
				answers[k] = append(answers[k], a)
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	for k, as := range answers {
		key := fmt.Sprintf("mixed-%d", k)
		assert.Equal(t, 1, b.count(key), "key %s ran more than once", key)
		firsts := 0
		for _, a := range as {
			assert.Equal(t, as[0].chargeID, a.chargeID, "key %s", key)
			assert.Equal(t, as[0].chargedBy, a.chargedBy, "key %s: the handler's header differs", key)
			if !a.replayed {
				firsts++
			}
		}
		assert.Equal(t, 1, firsts, "key %s: exactly one answer is the first execution", key)
	}
}
