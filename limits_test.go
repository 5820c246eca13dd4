package idempotency_test

import (
	"bytes"
	"context"
	"google.golang.org/grpc"
	"log/slog"
	"math"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"

	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/memstore"
)

// TestDurationOptionsOutOfRange: a duration option outside its documented
// bounds is refused by NewServer, with a message that
// names the option and its range, instead of a lease that lets every
// duplicate run or a retention that overflows a store's clock.
func TestDurationOptionsOutOfRange(t *testing.T) {
	store := memstore.New()
	defer store.Close()
	cases := []struct {
		opt  idempotency.Option
		want string
	}{
		{idempotency.WithLease(time.Millisecond), "WithLease(1ms) is out of range: use 1s to 1h0m0s"},
		{idempotency.WithLease(math.MaxInt64), "WithLease(2562047h47m16.854775807s) is out of range"},
		{idempotency.WithLease(-time.Second), "WithLease(-1s) is out of range"},
		{idempotency.WithRetention(math.MaxInt64), "WithRetention(2562047h47m16.854775807s) is out of range: use 10ms to 87600h0m0s"},
		{idempotency.WithRetention(250 * 365 * 24 * time.Hour), "WithRetention(2190000h0m0s) is out of range"},
		{idempotency.WithRetention(time.Microsecond), "WithRetention(1µs) is out of range"},
		{idempotency.WithWaitTimeout(2 * time.Hour), "WithWaitTimeout(2h0m0s) is out of range"},
		{idempotency.WithStoreTimeout(time.Millisecond), "WithStoreTimeout(1ms) is out of range"},
		{idempotency.WithStoreTimeout(math.MaxInt64), "WithStoreTimeout(2562047h47m16.854775807s) is out of range"},
	}
	for _, c := range cases {
		_, err := idempotency.NewServer(store, c.opt)
		require.Error(t, err, c.want)
		assert.Contains(t, err.Error(), c.want)
		assert.Contains(t, err.Error(), "or 0 for the default")
	}
	_, err := idempotency.NewServer(nil)
	assert.ErrorContains(t, err, "needs a Store")
	// Zero keeps the default; the bounds themselves are accepted.
	_, err = idempotency.NewServer(store, idempotency.WithLease(0), idempotency.WithRetention(0),
		idempotency.WithLease(idempotency.MinLease), idempotency.WithLease(idempotency.MaxLease),
		idempotency.WithRetention(idempotency.MinRetention), idempotency.WithRetention(idempotency.MaxRetention),
		idempotency.WithWaitTimeout(idempotency.MaxWaitTimeout), idempotency.WithStoreTimeout(idempotency.MinStoreTimeout))
	assert.NoError(t, err)
}

// TestStoresRefuseOutOfRangeDurations: the in-process stores refuse a lease
// or retention that they could not convert, rather than storing a record
// that is expired when written or overflows at restart.
func TestStoresRefuseOutOfRangeDurations(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t testing.TB) idempotency.Store) {
		s := newStore(t)
		ctx := context.Background()
		_, err := s.Reserve(ctx, "k", idempotency.Claim{Token: "t", Lease: math.MaxInt64})
		assert.ErrorContains(t, err, "out of range")
		_, err = s.Reserve(ctx, "k", idempotency.Claim{Token: "t", Lease: 0})
		assert.ErrorContains(t, err, "out of range")
		e, err := s.Reserve(ctx, "k", idempotency.Claim{Token: "t", Lease: time.Minute})
		require.NoError(t, err)
		require.Equal(t, idempotency.Acquired, e.State)
		assert.ErrorContains(t, s.Complete(ctx, "k", "t", []byte("r"), math.MaxInt64), "out of range")
		require.NoError(t, s.Complete(ctx, "k", "t", []byte("r"), idempotency.MaxRetention))
		e, err = s.Lookup(ctx, "k")
		require.NoError(t, err)
		require.Equal(t, idempotency.Completed, e.State)
		assert.WithinDuration(t, time.Now().Add(idempotency.MaxRetention), e.Expires, time.Minute)
	})
}

// TestBoltMaxRetentionSurvivesRestart: a record kept for the longest
// retention is still there after the file is reopened (an expiry past the
// year 2262 used to overflow its nanoseconds and read as long expired).
func TestBoltMaxRetentionSurvivesRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "idem.db")
	s, err := boltstore.Open(path)
	require.NoError(t, err)
	e := newEnv(t, s, envConfig{server: []idempotency.Option{idempotency.WithRetention(idempotency.MaxRetention)}})
	ctx := testCtx(t)
	req := &testpb.ChargeRequest{Account: "a", AmountCents: 1, Currency: "EUR"}
	first, err := e.client.Charge(withKey(ctx, "k"), req)
	require.NoError(t, err)
	require.NoError(t, s.Close())

	s2 := openBolt(t, path)
	e2 := newEnv(t, s2, envConfig{})
	again, err := e2.client.Charge(withKey(ctx, "k"), req)
	require.NoError(t, err)
	assert.Equal(t, first.ChargeId, again.ChargeId, "the record was lost at restart")
	assert.Zero(t, e2.svc.execs.Load())
}

// TestScopeTooLong: a (scope, key) whose store key would be longer than
// every store can hold is refused before the handler runs, with a status
// that says why, on every store (a 40,000-byte scope used to make bbolt run
// every call: Reserve succeeded in memory and the write failed).
func TestScopeTooLong(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t testing.TB) idempotency.Store) {
		for _, n := range []int{idempotency.MaxScopeLength + 1, 40_000} {
			scope := strings.Repeat("s", n)
			e := newEnv(t, newStore(t), envConfig{server: []idempotency.Option{
				idempotency.WithScope(func(context.Context) (string, error) { return scope, nil }),
			}})
			ctx := testCtx(t)
			for range 3 {
				_, err := e.client.Charge(withKey(ctx, "k"), &testpb.ChargeRequest{Account: "a", AmountCents: 1, Currency: "EUR"})
				require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
				assert.Contains(t, status.Convert(err).Message(), "scopes of at most 256 bytes")
			}
			assert.Zero(t, e.svc.execs.Load(), "the handler ran for a key no store can hold")
		}
		// The longest scope, made three times longer by escaping, works.
		scope := strings.Repeat("/", idempotency.MaxScopeLength)
		e := newEnv(t, newStore(t), envConfig{server: []idempotency.Option{
			idempotency.WithScope(func(context.Context) (string, error) { return scope, nil }),
		}})
		ctx := testCtx(t)
		key := strings.Repeat("k", idempotency.MaxKeyLength)
		req := &testpb.ChargeRequest{Account: "a", AmountCents: 1, Currency: "EUR"}
		first, err := e.client.Charge(withKey(ctx, key), req)
		require.NoError(t, err)
		again, err := e.client.Charge(withKey(ctx, key), req)
		require.NoError(t, err)
		assert.Equal(t, first.ChargeId, again.ChargeId)
		assert.Equal(t, int64(1), e.svc.execs.Load())
	})
}

// TestStoresRefuseKeysTooLong: the in-process stores refuse a store key
// longer than MaxStoreKeyLength with ErrKeyTooLong.
func TestStoresRefuseKeysTooLong(t *testing.T) {
	stores(t, func(t *testing.T, newStore func(t testing.TB) idempotency.Store) {
		s := newStore(t)
		_, err := s.Reserve(context.Background(), strings.Repeat("k", idempotency.MaxStoreKeyLength+1), idempotency.Claim{Token: "t", Lease: time.Minute})
		assert.ErrorIs(t, err, idempotency.ErrKeyTooLong)
	})
}

// TestUnguardedStreamsAreLogged: a Server whose stream interceptor was never
// installed says so, once, at the first unary call to a service that has
// streaming methods taking part (their retries would run twice, silently).
func TestUnguardedStreamsAreLogged(t *testing.T) {
	for _, both := range []bool{false, true} {
		var logs bytes.Buffer
		idem, err := idempotency.NewServer(memstore.New(), idempotency.WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
		require.NoError(t, err)
		opts := []grpc.ServerOption{grpc.UnaryInterceptor(idem.UnaryServerInterceptor())}
		if both {
			opts = idem.ServerOptions()
		}
		e := newEnv(t, memstore.New(), envConfig{serverOpt: opts})
		for range 2 {
			_, err := e.client.Charge(withKey(testCtx(t), idempotency.NewKey()), &testpb.ChargeRequest{Account: "a", AmountCents: 1, Currency: "EUR"})
			require.NoError(t, err)
		}
		n := strings.Count(logs.String(), "StreamServerInterceptor is not installed")
		if both {
			assert.Zero(t, n, "both interceptors are installed: %s", logs.String())
		} else {
			assert.Equal(t, 1, n, "one error, naming a streaming method: %s", logs.String())
			assert.Contains(t, logs.String(), "method=/idempotency.testing.v1.PaymentService/ChargeInstallments")
		}
	}
}
