package idempotency_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
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
	"github.com/grpcidem/idempotency/memstore"
)

const pauseChildEnv = "IDEMPOTENCY_PAUSE_CHILD"

// TestPausedProcessKeepsItsKeys pauses a server process (SIGSTOP) for longer
// than its lease while a handler runs and a duplicate waits, resumes it
// (SIGCONT), and sends another duplicate: the memory and bbolt stores keep
// their leases in the process, so the running handler's key is never taken
// over, and every call gets the one execution's answer.
func TestPausedProcessKeepsItsKeys(t *testing.T) {
	if spec := os.Getenv(pauseChildEnv); spec != "" {
		pauseChild(t, spec)
		return
	}
	if testing.Short() {
		t.Skip("starts, pauses and resumes server processes")
	}
	for _, kind := range []string{"memory", "bolt"} {
		t.Run(kind, func(t *testing.T) {
			spec := kind + ":" + filepath.Join(t.TempDir(), "idem.db")
			child := startServerProcess(t, "TestPausedProcessKeepsItsKeys", pauseChildEnv+"="+spec)
			conn, err := grpc.NewClient(child.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			require.NoError(t, err)
			defer conn.Close()
			client := testpb.NewPaymentServiceClient(conn)

			for round := range 2 {
				key := fmt.Sprintf("pause-%s-%d", kind, round)
				req := &testpb.ChargeRequest{Account: "acct-" + key, AmountCents: 100, Currency: "EUR"}
				type answer struct {
					resp     *testpb.ChargeResponse
					replayed bool
					err      error
				}
				call := func() answer {
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					defer cancel()
					var header metadata.MD
					resp, err := client.Charge(withKey(ctx, key), req, grpc.Header(&header))
					return answer{resp, idempotency.IsReplayed(header), err}
				}
				answers := make([]answer, 3)
				var wg sync.WaitGroup
				wg.Go(func() { answers[0] = call() })
				time.Sleep(300 * time.Millisecond) // the first call runs
				wg.Go(func() { answers[1] = call() })
				time.Sleep(200 * time.Millisecond) // the duplicate waits

				// Paused for 2.5 leases, in the middle of a 3 s handler.
				require.NoError(t, child.cmd.Process.Signal(syscall.SIGSTOP))
				time.Sleep(2500 * time.Millisecond)
				require.NoError(t, child.cmd.Process.Signal(syscall.SIGCONT))
				time.Sleep(500 * time.Millisecond)
				answers[2] = call()
				wg.Wait()

				for i, a := range answers {
					require.NoError(t, a.err, "round %d, call %d", round, i)
				}
				assert.False(t, answers[0].replayed, "round %d: the first call is the execution", round)
				for i, a := range answers[1:] {
					assert.True(t, a.replayed, "round %d: duplicate %d is a replay", round, i+1)
					assert.Equal(t, answers[0].resp.ChargeId, a.resp.ChargeId,
						"round %d: duplicate %d got another execution's charge: the handler ran twice", round, i+1)
				}
			}
		})
	}
}

// slowPayments takes 3 seconds to charge.
type slowPayments struct{ payments }

func (p *slowPayments) Charge(ctx context.Context, req *testpb.ChargeRequest) (*testpb.ChargeResponse, error) {
	time.Sleep(3 * time.Second)
	return p.payments.Charge(ctx, req)
}

// pauseChild serves slowPayments with a 1 s lease until it is killed, or for
// at most two minutes.
func pauseChild(t *testing.T, spec string) {
	kind, path, _ := strings.Cut(spec, ":")
	var store idempotency.Store = memstore.New()
	if kind == "bolt" {
		var err error
		store, err = boltstore.Open(path)
		require.NoError(t, err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	opts := []idempotency.Option{idempotency.WithLease(time.Second)}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(mustServer(store, opts...).UnaryServerInterceptor()))
	testpb.RegisterPaymentServiceServer(srv, &slowPayments{})
	go func() { _ = srv.Serve(lis) }()
	fmt.Printf("ADDR %s\n", lis.Addr())
	time.Sleep(2 * time.Minute)
	srv.Stop()
	store.Close()
}
