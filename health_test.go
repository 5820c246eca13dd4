package idempotency_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/internal/tmpfs"
	"github.com/grpcidem/idempotency/memstore"
)

// healthEnv is a server with the idempotency interceptors and the standard
// health service, whose status WatchHealth drives.
type healthEnv struct {
	idem   *idempotency.Server
	svc    *payments
	client testpb.PaymentServiceClient
	health healthpb.HealthClient
}

func newHealthEnv(t *testing.T, store idempotency.Store, interval time.Duration, opts ...idempotency.Option) *healthEnv {
	t.Helper()
	e := &healthEnv{idem: mustServer(store, opts...), svc: &payments{}}
	hs := health.NewServer()
	ctx, cancel := context.WithCancel(context.Background())
	var watching sync.WaitGroup
	watching.Go(func() {
		e.idem.WatchHealth(ctx, interval, func(serving bool, _ error) {
			st := healthpb.HealthCheckResponse_SERVING
			if !serving {
				st = healthpb.HealthCheckResponse_NOT_SERVING
			}
			hs.SetServingStatus("", st)
		})
	})
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(e.idem.ServerOptions()...)
	testpb.RegisterPaymentServiceServer(srv, e.svc)
	healthpb.RegisterHealthServer(srv, hs)
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	e.client, e.health = testpb.NewPaymentServiceClient(conn), healthpb.NewHealthClient(conn)
	t.Cleanup(func() {
		cancel()
		watching.Wait()
		conn.Close()
		srv.Stop()
	})
	return e
}

// waitStatus polls the health service until it reports want.
func (e *healthEnv) waitStatus(t *testing.T, want healthpb.HealthCheckResponse_ServingStatus, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		resp, err := e.health.Check(testCtx(t), &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		if resp.Status == want {
			return
		}
		require.True(t, time.Now().Before(deadline), "the health service still reports %v, want %v", resp.Status, want)
		time.Sleep(20 * time.Millisecond)
	}
}

// switchStore is a memory store that can be made to fail, as an unreachable
// one does: every Reserve and Lookup fails while down is set.
type switchStore struct {
	idempotency.Store
	down atomic.Bool
}

func (s *switchStore) Reserve(ctx context.Context, key string, c idempotency.Claim) (idempotency.Entry, error) {
	if s.down.Load() {
		return idempotency.Entry{}, errStoreDown
	}
	return s.Store.Reserve(ctx, key, c)
}

func (s *switchStore) Lookup(ctx context.Context, key string) (idempotency.Entry, error) {
	if s.down.Load() {
		return idempotency.Entry{}, errStoreDown
	}
	return s.Store.Lookup(ctx, key)
}

// A store error seen by a call makes the server NOT_SERVING at once, without
// waiting for the next check of the store; a check that passes afterwards
// makes it SERVING again, without a call. With fail-open, the server keeps
// serving.
func TestHealthFollowsStoreErrors(t *testing.T) {
	store := &switchStore{Store: memstore.New()}
	// The interval is long: only a call's error can change the status
	// before the next check.
	e := newHealthEnv(t, store, time.Hour, idempotency.WithLogger(nil))
	ctx := testCtx(t)
	e.waitStatus(t, healthpb.HealthCheckResponse_SERVING, 5*time.Second)
	require.NoError(t, e.idem.Health(ctx))

	store.down.Store(true)
	_, err := e.client.Charge(withKey(ctx, "k1"), chargeReq)
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
	e.waitStatus(t, healthpb.HealthCheckResponse_NOT_SERVING, 5*time.Second)
	err = e.idem.Health(ctx)
	require.ErrorIs(t, err, idempotency.ErrStoreUnhealthy)
	assert.ErrorIs(t, err, errStoreDown)

	// The store is back, and no call came: a check says so.
	store.down.Store(false)
	require.NoError(t, e.idem.Health(ctx))
	_, err = e.client.Charge(withKey(ctx, "k2"), chargeReq)
	require.NoError(t, err)

	open := newHealthEnv(t, store, 10*time.Millisecond, idempotency.WithLogger(nil), idempotency.WithFailOpen())
	store.down.Store(true)
	_, err = open.client.Charge(withKey(ctx, "k3"), chargeReq)
	require.NoError(t, err, "fail-open runs the call")
	assert.NoError(t, open.idem.Health(ctx), "a fail-open server serves while its store fails")
	time.Sleep(50 * time.Millisecond) // a few checks
	open.waitStatus(t, healthpb.HealthCheckResponse_SERVING, time.Second)
}

// The standard health service reports NOT_SERVING while a bbolt store cannot
// write (its disk is full), and SERVING again once it can, with no call made
// meanwhile: bbolt's probe finds the space, and the next check sees it.
func TestHealthBoltFullDisk(t *testing.T) {
	dir := tmpfs.Mount(t, "4m")
	store := openBolt(t, filepath.Join(dir, "idem.db"))
	e := newHealthEnv(t, store, 50*time.Millisecond,
		idempotency.WithLease(time.Second),
		idempotency.WithStoreTimeout(300*time.Millisecond),
		idempotency.WithLogger(nil))
	ctx := testCtx(t)
	e.waitStatus(t, healthpb.HealthCheckResponse_SERVING, 5*time.Second)
	_, err := e.client.Charge(withKey(ctx, "before"), chargeReq)
	require.NoError(t, err)

	filler := filepath.Join(dir, "filler")
	tmpfs.Fill(t, filler)
	// Its record needs pages the full disk cannot give: the commit fails.
	big := &testpb.ChargeRequest{Account: strings.Repeat("a", 512<<10), AmountCents: 100, Currency: "EUR"}
	_, err = e.client.Charge(withKey(ctx, "unsaved"), big)
	require.NoError(t, err)
	e.waitStatus(t, healthpb.HealthCheckResponse_NOT_SERVING, 5*time.Second)
	require.ErrorIs(t, e.idem.Health(ctx), idempotency.ErrStoreUnhealthy)
	_, err = e.client.Charge(withKey(ctx, "refused"), chargeReq)
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
	// It stays NOT_SERVING while the disk is full.
	time.Sleep(300 * time.Millisecond)
	e.waitStatus(t, healthpb.HealthCheckResponse_NOT_SERVING, 0)

	require.NoError(t, os.Remove(filler))
	e.waitStatus(t, healthpb.HealthCheckResponse_SERVING, 15*time.Second)
	require.NoError(t, e.idem.Health(ctx))
	_, err = e.client.Charge(withKey(ctx, "after"), chargeReq)
	require.NoError(t, err)
}

// Every observer gets every event, with the call's context.
func TestObserversCompose(t *testing.T) {
	type ctxKey struct{}
	var mu sync.Mutex
	var got [2][]idempotency.EventKind
	observe := func(i int) idempotency.Option {
		return idempotency.WithObserver(func(ctx context.Context, ev idempotency.Event) {
			if ctx.Value(ctxKey{}) != "outer" {
				t.Errorf("the observer did not get the call's context")
			}
			mu.Lock()
			got[i] = append(got[i], ev.Kind)
			mu.Unlock()
		})
	}
	outer := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		return handler(context.WithValue(ctx, ctxKey{}, "outer"), req)
	}
	e := newEnv(t, memstore.New(), envConfig{
		server:    []idempotency.Option{observe(0), nil, observe(1)},
		serverOpt: []grpc.ServerOption{grpc.ChainUnaryInterceptor(outer)},
	})
	ctx := withKey(testCtx(t), "k")
	require.NoError(t, charge(ctx, e, chargeReq).err)
	require.NoError(t, charge(ctx, e, chargeReq).err)
	mu.Lock()
	defer mu.Unlock()
	want := []idempotency.EventKind{idempotency.EventExecuted, idempotency.EventReplayed}
	assert.Equal(t, want, got[0])
	assert.Equal(t, want, got[1])
}
