package pgstore_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/stretchr/testify/assert"
	"google.golang.org/grpc/metadata"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/idemconnect"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/internal/testpb/testpbconnect"
)

// connectTx serves txPayments' Charge as a connect handler: its row is
// written in the transaction pgstore commits with the record, through the
// connect adapter as through the gRPC interceptors.
type connectTx struct {
	testpbconnect.UnimplementedPaymentServiceHandler
	p *txPayments
}

func (c connectTx) Charge(ctx context.Context, req *connect.Request[testpb.ChargeRequest]) (*connect.Response[testpb.ChargeResponse], error) {
	resp, err := c.p.Charge(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(resp), nil
}

// TestGRPCAndConnectReplicasShareTheTable: a grpc-go replica and a connect
// replica, each with its own pool and store on one table, in transactional
// mode, take duplicates of the same keys at once. Each key commits one
// business row, and every answer carries that row's charge.
func TestGRPCAndConnectReplicasShareTheTable(t *testing.T) {
	pool, table, grpcStore := setup(t)
	biz := newBusiness(t, pool)
	connectStore := newStore(t, newPool(t, nil), table)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serve(t, lis, &txPayments{store: grpcStore, biz: biz})
	grpcClient := dial(t, lis.Addr().String())

	mux := http.NewServeMux()
	mux.Handle(testpbconnect.NewPaymentServiceHandler(connectTx{p: &txPayments{store: connectStore, biz: biz}},
		connect.WithInterceptors(idemconnect.NewInterceptor(mustServer(connectStore)))))
	hs := httptest.NewServer(mux)
	t.Cleanup(hs.Close)
	connectClient := testpbconnect.NewPaymentServiceClient(hs.Client(), hs.URL)

	const keys, dups = 20, 4
	ids := make([][]string, keys)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for k := range keys {
		key := fmt.Sprintf("mixed-%s-%d", randomHex(4), k)
		for d := range dups {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				var id string
				if (k+d)%2 == 0 {
					resp, err := grpcClient.Charge(metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, key), &testpb.ChargeRequest{Account: "a", AmountCents: 5})
					if !assert.NoError(t, err) {
						return
					}
					id = resp.ChargeId
				} else {
					req := connect.NewRequest(&testpb.ChargeRequest{Account: "a", AmountCents: 5})
					req.Header().Set(idemconnect.KeyHeader, key)
					resp, err := connectClient.Charge(ctx, req)
					if !assert.NoError(t, err) {
						return
					}
					id = resp.Msg.ChargeId
				}
				mu.Lock()
				ids[k] = append(ids[k], key+" "+id)
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	for _, got := range ids {
		if !assert.Len(t, got, dups) {
			continue
		}
		var key, first string
		fmt.Sscan(got[0], &key, &first)
		assert.Equal(t, 1, biz.rows(t, key), "key %s committed more than one row", key)
		for _, g := range got {
			assert.Equal(t, key+" "+first, g)
		}
	}
}
