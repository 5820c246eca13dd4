package idempotency_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"

	"github.com/grpcidem/idempotency/boltstore"
)

const crashChildEnv = "IDEMPOTENCY_CRASH_CHILD_DB"

// ack is a call and what its client was answered: after the answer, every
// duplicate must replay exactly this, even if the server process dies the
// next instant. A call is a unary Charge, or ChargeInstallments (a server
// stream) when plan is set.
type ack struct {
	charge          *testpb.ChargeRequest
	plan            *testpb.InstallmentsRequest
	msgs            [][]byte
	header, trailer metadata.MD
}

// call makes a's call with key and returns it with what was answered.
func (a ack) call(ctx context.Context, t *testing.T, client testpb.PaymentServiceClient, key string) (ack, error) {
	ctx = withKey(ctx, key)
	a.msgs = nil
	if a.plan == nil {
		resp, err := client.Charge(ctx, a.charge, grpc.Header(&a.header), grpc.Trailer(&a.trailer))
		if err != nil {
			return a, err
		}
		a.msgs = append(a.msgs, mustMarshal(t, resp))
		return a, nil
	}
	stream, err := client.ChargeInstallments(ctx, a.plan)
	if err != nil {
		return a, err
	}
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return a, err
		}
		a.msgs = append(a.msgs, mustMarshal(t, resp))
	}
	if a.header, err = stream.Header(); err != nil {
		return a, err
	}
	a.trailer = stream.Trailer()
	return a, nil
}

// TestBoltKilledMidLoadKeepsEveryAnswer runs the server in a second process
// on a bbolt file, sends it first executions (unary and server-streaming)
// from 16 callers at once, and
// kills it with SIGKILL in the middle of the load, three times over on the
// same file. Every answer a client received must then replay byte for byte
// from the file, without the handler running: a first execution is
// answered only once its record is durable. The file must also pass bbolt's
// consistency check.
func TestBoltKilledMidLoadKeepsEveryAnswer(t *testing.T) {
	if path := os.Getenv(crashChildEnv); path != "" {
		crashChild(t, path)
		return
	}
	if testing.Short() {
		t.Skip("starts and kills server processes")
	}
	path := filepath.Join(t.TempDir(), "idem.db")
	var (
		mu    sync.Mutex
		acked = map[string]ack{}
	)
	for round := range 3 {
		child := startServerProcess(t, "TestBoltKilledMidLoadKeepsEveryAnswer", crashChildEnv+"="+path)
		conn, err := grpc.NewClient(child.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		client := testpb.NewPaymentServiceClient(conn)

		ctx, stop := context.WithTimeout(context.Background(), 30*time.Second)
		var killed atomic.Bool
		var roundAcks atomic.Int64
		var wg sync.WaitGroup
		for w := range 16 {
			wg.Go(func() {
				for i := 0; ctx.Err() == nil; i++ {
					key := fmt.Sprintf("r%d-w%d-%d", round, w, i)
					a := ack{charge: &testpb.ChargeRequest{Account: "acct-" + key, AmountCents: int64(100 + i), Currency: "EUR"}}
					if w%4 == 0 {
						a = ack{plan: &testpb.InstallmentsRequest{Account: "acct-" + key, AmountCents: int64(900 + i), Currency: "EUR", Count: 3}}
					}
					got, err := a.call(ctx, t, client, key)
					if err != nil {
						if !killed.Load() {
							t.Errorf("round %d, %s: %v before the kill", round, key, err)
						}
						return
					}
					assert.False(t, idempotency.IsReplayed(got.header), "a fresh key is a first execution")
					mu.Lock()
					acked[key] = got
					mu.Unlock()
					roundAcks.Add(1)
				}
			})
		}
		// Kill once the load is under way, at a point that differs from
		// round to round, with calls in flight.
		for roundAcks.Load() < int64(100+50*round) && ctx.Err() == nil {
			time.Sleep(time.Millisecond)
		}
		killed.Store(true)
		child.kill()
		stop()
		wg.Wait()
		conn.Close()
		require.GreaterOrEqual(t, roundAcks.Load(), int64(100), "round %d: the load never got under way", round)
	}

	checkBolt(t, path)
	store := openBolt(t, path)
	e := newEnv(t, store, envConfig{})
	ctx := testCtx(t)
	for key, a := range acked {
		got, err := a.call(ctx, t, e.client, key)
		require.NoError(t, err, key)
		require.True(t, idempotency.IsReplayed(got.header), "%s was answered before the kill, so it must replay", key)
		assert.Equal(t, a.msgs, got.msgs, key)
		assert.Equal(t, stripped(a.header), stripped(got.header), key)
		assert.Equal(t, a.trailer, got.trailer, key)
	}
	assert.Zero(t, e.svc.execs.Load(), "no answered call ran again")
	t.Logf("%d answers, all replayed after 3 kills", len(acked))
}

// crashChild is the server process: it serves the payments service with
// the interceptor on the bbolt file at path until it is killed, or gives up
// after a minute so that it never outlives a failed test by long.
func crashChild(t *testing.T, path string) {
	store, err := boltstore.Open(path)
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(mustServer(store).UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(mustServer(store).StreamServerInterceptor()))
	testpb.RegisterPaymentServiceServer(srv, &payments{})
	go func() { _ = srv.Serve(lis) }()
	fmt.Printf("ADDR %s\n", lis.Addr())
	time.Sleep(time.Minute)
	srv.Stop()
	store.Close()
}
