package redisstore_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/redisstore"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
)

// These tests run the real interceptors on several gRPC servers in one
// process, each with its own Redis client and Store on one shared Redis, as
// replicas behind a load balancer do; the client picks the replica of every
// call itself.

// bank is the business state the replicas share (a database, in real life):
// it counts how often each account's charge really ran.
type bank struct {
	mu    sync.Mutex
	runs  map[string]int
	gates map[string]chan struct{} // the first run of these accounts blocks
	// entered receives an account when its gated run has started.
	entered chan string
}

func newBank() *bank {
	return &bank{runs: map[string]int{}, gates: map[string]chan struct{}{}, entered: make(chan string, 16)}
}

func (b *bank) gate(account string) chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	g := make(chan struct{})
	b.gates[account] = g
	return g
}

func (b *bank) run(account string) (gate chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.runs[account]++
	if b.runs[account] == 1 {
		return b.gates[account]
	}
	return nil
}

func (b *bank) count(account string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.runs[account]
}

type paymentServer struct {
	testpb.UnimplementedPaymentServiceServer
	replica int
	bank    *bank
}

func (p *paymentServer) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	if gate := p.bank.run(req.Account); gate != nil {
		p.bank.entered <- req.Account
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	} else {
		time.Sleep(20 * time.Millisecond) // long enough for duplicates to overlap
	}
	// The handler's own header must come back byte-identical on a replay,
	// whichever replica answers it.
	if err := grpc.SetHeader(ctx, metadata.Pairs("charged-by", strconv.Itoa(p.replica))); err != nil {
		return nil, err
	}
	return &testpb.ChargeResponse{
		ChargeId:    fmt.Sprintf("ch-%d-%s", p.replica, randomHex(8)),
		Account:     req.Account,
		AmountCents: req.AmountCents,
		Currency:    req.Currency,
	}, nil
}

func (p *paymentServer) ChargeInstallments(req *testpb.InstallmentsRequest, stream grpc.ServerStreamingServer[testpb.ChargeResponse]) error {
	p.bank.run(req.Account)
	for i := range req.Count {
		if err := stream.Send(&testpb.ChargeResponse{
			ChargeId:    fmt.Sprintf("ch-%d-%s-%d", p.replica, randomHex(4), i),
			Account:     req.Account,
			AmountCents: req.AmountCents / int64(req.Count),
			Currency:    req.Currency,
		}); err != nil {
			return err
		}
	}
	return nil
}

// mortalStore is a replica's Store whose lease renewals can be stopped, as
// when the replica freezes or its network to Redis breaks mid-handler.
type mortalStore struct {
	idempotency.Store
	dead atomic.Bool
}

func (m *mortalStore) Renew(ctx context.Context, key string, claim idempotency.Claim) error {
	if m.dead.Load() {
		return errors.New("replica is dead")
	}
	return m.Store.Renew(ctx, key, claim)
}

type replica struct {
	store  *mortalStore
	client testpb.PaymentServiceClient
	eventLog
}

// newReplicas starts n replicas on loopback sharing one Redis prefix, with
// waiters that only pub/sub can wake.
func newReplicas(t *testing.T, n int, lease time.Duration, b *bank) []*replica {
	t.Helper()
	admin := newClient(t)
	prefix := testPrefix(t, admin)
	var rs []*replica
	for i := range n {
		st := newStore(t, newClient(t), prefix, noRecheck)
		r := &replica{store: &mortalStore{Store: st}}
		opts := []idempotency.Option{idempotency.WithLease(lease), idempotency.WithObserver(r.observe), idempotency.WithLogger(nil)}
		srv := grpc.NewServer(
			grpc.UnaryInterceptor(mustServer(r.store, opts...).UnaryServerInterceptor()),
			grpc.StreamInterceptor(mustServer(r.store, opts...).StreamServerInterceptor()),
		)
		testpb.RegisterPaymentServiceServer(srv, &paymentServer{replica: i, bank: b})
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		served := make(chan struct{})
		go func() {
			defer close(served)
			_ = srv.Serve(lis)
		}()
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		t.Cleanup(func() {
			_ = conn.Close()
			srv.Stop()
			<-served
		})
		r.client = testpb.NewPaymentServiceClient(conn)
		rs = append(rs, r)
	}
	return rs
}

type chargeResult struct {
	resp     *testpb.ChargeResponse
	header   metadata.MD
	replayed bool
	err      error
}

func charge(ctx context.Context, r *replica, key, account string) chargeResult {
	return chargeVia(ctx, r.client, key, account)
}

// chargeVia sends a Charge of account with key through client.
func chargeVia(ctx context.Context, client testpb.PaymentServiceClient, key, account string) chargeResult {
	var header metadata.MD
	ctx = metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, key)
	resp, err := client.Charge(ctx, &testpb.ChargeRequest{Account: account, AmountCents: 1250, Currency: "EUR"}, grpc.Header(&header))
	return chargeResult{resp: resp, header: header, replayed: idempotency.IsReplayed(header), err: err}
}

// Duplicates of many calls, concurrent and spread over three replicas: each
// key runs once, and every duplicate gets the first execution's answer.
func TestReplicasExecuteEachKeyOnce(t *testing.T) { forEachMode(t, testReplicasExecuteEachKeyOnce) }

func testReplicasExecuteEachKeyOnce(t *testing.T, m storeMode) {
	b := newBank()
	rs := newReplicas(t, 3, 5*time.Second, b)
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()

	const keys, dups = 40, 6
	results := make([][]chargeResult, keys)
	var wg sync.WaitGroup
	for k := range keys {
		results[k] = make([]chargeResult, dups)
		for d := range dups {
			wg.Go(func() {
				results[k][d] = charge(ctx, rs[(k+d)%len(rs)], "key-"+strconv.Itoa(k), "acct-"+strconv.Itoa(k))
			})
		}
	}
	wg.Wait()

	for k := range keys {
		assert.Equal(t, 1, b.count("acct-"+strconv.Itoa(k)), "key %d ran more than once", k)
		first := 0
		for d, r := range results[k] {
			require.NoError(t, r.err, "key %d duplicate %d", k, d)
			assert.True(t, proto.Equal(results[k][0].resp, r.resp), "key %d: answers differ", k)
			assert.Equal(t, results[k][0].header.Get("charged-by"), r.header.Get("charged-by"))
			if !r.replayed {
				first++
			}
		}
		assert.Equal(t, 1, first, "key %d: answers not marked as replays", k)
	}

	// Later retries, on every replica, replay too; and so does a
	// server stream, whose messages come back in order.
	for i, r := range rs {
		res := charge(ctx, r, "key-0", "acct-0")
		require.NoError(t, res.err)
		assert.True(t, res.replayed)
		assert.True(t, proto.Equal(results[0][0].resp, res.resp), "replica %d", i)
	}
	var streams [][]*testpb.ChargeResponse
	for _, r := range rs {
		sctx := metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, "installments")
		st, err := r.client.ChargeInstallments(sctx, &testpb.InstallmentsRequest{Account: "inst", AmountCents: 900, Currency: "EUR", Count: 3})
		require.NoError(t, err)
		var got []*testpb.ChargeResponse
		for {
			m, err := st.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			require.NoError(t, err)
			got = append(got, m)
		}
		streams = append(streams, got)
	}
	assert.Equal(t, 1, b.count("inst"))
	for _, got := range streams[1:] {
		require.Len(t, got, 3)
		for i := range got {
			assert.True(t, proto.Equal(streams[0][i], got[i]))
		}
	}
}

// A duplicate that reaches another replica while the first call runs waits,
// and is woken by the first replica's Complete through Redis pub/sub (the
// stores do not re-check by themselves here).
func TestReplicasWaiterGetsReplay(t *testing.T) {
	b := newBank()
	rs := newReplicas(t, 2, 5*time.Second, b)
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()

	gate := b.gate("gated")
	firstDone := make(chan chargeResult, 1)
	go func() { firstDone <- charge(ctx, rs[0], "k", "gated") }()
	require.Equal(t, "gated", <-b.entered)

	dupDone := make(chan chargeResult, 1)
	go func() { dupDone <- charge(ctx, rs[1], "k", "gated") }()
	// The duplicate is waiting once replica 1 has marked the key.
	waitForWaiter(t, newClient(t), rs[1].store.Store.(*redisstore.Store), idempotency.StoreKey("", "k"))
	close(gate)

	first, dup := <-firstDone, <-dupDone
	require.NoError(t, first.err)
	require.NoError(t, dup.err)
	assert.False(t, first.replayed)
	assert.True(t, dup.replayed)
	assert.True(t, proto.Equal(first.resp, dup.resp))
	assert.Equal(t, []string{"0"}, dup.header.Get("charged-by"))
	assert.Equal(t, 1, b.count("gated"))
	assert.Len(t, rs[1].of(idempotency.EventReplayed), 1)
}

// A replica dies mid-handler: its renewals stop, its lease runs out in
// Redis, and a retry on another replica runs the call. When the dead
// replica's handler finally returns, its outcome is fenced off: the record
// stays the one of the replica that took over.
func TestReplicaDiesMidHandler(t *testing.T) {
	b := newBank()
	rs := newReplicas(t, 3, time.Second, b)
	ctx, cancel := context.WithTimeout(context.Background(), eventually)
	defer cancel()

	gate := b.gate("doomed")
	zombie := make(chan chargeResult, 1)
	go func() { zombie <- charge(ctx, rs[0], "k", "doomed") }()
	require.Equal(t, "doomed", <-b.entered)
	rs[0].store.dead.Store(true)

	// The retry waits for the lease to run out, then runs on replica 1.
	retry := charge(ctx, rs[1], "k", "doomed")
	require.NoError(t, retry.err)
	assert.False(t, retry.replayed)
	assert.Equal(t, []string{"1"}, retry.header.Get("charged-by"))
	assert.Equal(t, 2, b.count("doomed"))

	// The zombie finishes: its caller gets its real outcome, but the
	// store refuses its record.
	close(gate)
	z := <-zombie
	require.NoError(t, z.err)
	assert.False(t, z.replayed)
	assert.Equal(t, []string{"0"}, z.header.Get("charged-by"))
	var fenced bool
	for _, e := range rs[0].of(idempotency.EventStoreError) {
		fenced = fenced || errors.Is(e.Err, idempotency.ErrNotOwner)
	}
	assert.True(t, fenced, "replica 0's Complete was not refused with ErrNotOwner")

	// Everyone now gets the outcome of the replica that took over.
	later := charge(ctx, rs[2], "k", "doomed")
	require.NoError(t, later.err)
	assert.True(t, later.replayed)
	assert.True(t, proto.Equal(retry.resp, later.resp))
	assert.Equal(t, 2, b.count("doomed"))
}
