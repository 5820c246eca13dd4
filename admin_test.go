package idempotency_test

import (
	"context"
	"net"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/memstore"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// adminClient serves the admin service on store over bufconn.
func adminClient(t *testing.T, store idempotency.Store) idempotencyv1.AdminClient {
	t.Helper()
	svc, err := idempotency.NewAdminServer(store)
	require.NoError(t, err)
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer()
	idempotencyv1.RegisterAdminServer(srv, svc)
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///admin",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close(); srv.Stop() })
	return idempotencyv1.NewAdminClient(conn)
}

// notInspector is a Store without the optional Inspector.
type notInspector struct{ idempotency.Store }

func TestAdminServerNeedsAnInspector(t *testing.T) {
	_, err := idempotency.NewAdminServer(notInspector{memstore.New()})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "idempotency.Inspector")
	_, err = idempotency.NewAdminServer(nil)
	require.Error(t, err)
}

// Bad requests are InvalidArgument, and say what to send instead.
func TestAdminBadRequests(t *testing.T) {
	store := memstore.New()
	t.Cleanup(func() { store.Close() })
	c := adminClient(t, store)
	ctx := t.Context()
	long := []byte(strings.Repeat("k", idempotency.MaxKeyLength+1))

	// A real token of one listing, to pass to another.
	for i := range 3 {
		key := idempotency.StoreKey("s", "k"+string(rune('a'+i)))
		_, err := store.Reserve(ctx, key, idempotency.Claim{Token: "t", Lease: 1e9 * 60})
		require.NoError(t, err)
	}
	page, err := c.ListRecords(ctx, &idempotencyv1.ListRecordsRequest{Scope: []byte("s"), PageSize: 1})
	require.NoError(t, err)
	require.Len(t, page.Records, 1)
	require.NotEmpty(t, page.NextPageToken)

	for _, tc := range []struct {
		name string
		call func() error
		want string
	}{
		{"page size too large", func() error {
			_, err := c.ListRecords(ctx, &idempotencyv1.ListRecordsRequest{PageSize: 1001})
			return err
		}, "page_size 1001 is out of range: 1 to 1000"},
		{"negative page size", func() error {
			_, err := c.ListRecords(ctx, &idempotencyv1.ListRecordsRequest{PageSize: -1})
			return err
		}, "out of range"},
		{"garbage page token", func() error {
			_, err := c.ListRecords(ctx, &idempotencyv1.ListRecordsRequest{PageToken: "xyz"})
			return err
		}, "pass the next_page_token of the previous page unchanged"},
		{"token of another listing", func() error {
			_, err := c.ListRecords(ctx, &idempotencyv1.ListRecordsRequest{Scope: []byte("other"), PageToken: page.NextPageToken})
			return err
		}, "belongs to another scope"},
		{"all scopes with a scope", func() error {
			_, err := c.ListRecords(ctx, &idempotencyv1.ListRecordsRequest{AllScopes: true, Scope: []byte("s")})
			return err
		}, "leave scope and key_prefix empty"},
		{"prefix too long", func() error {
			_, err := c.ListRecords(ctx, &idempotencyv1.ListRecordsRequest{KeyPrefix: long})
			return err
		}, "key_prefix is 256 bytes long"},
		{"key too long", func() error {
			_, err := c.GetRecord(ctx, &idempotencyv1.GetRecordRequest{Key: long})
			return err
		}, "key is 256 bytes long"},
		{"no key", func() error {
			_, err := c.ForgetRecord(ctx, &idempotencyv1.ForgetRecordRequest{})
			return err
		}, "key is required"},
		{"scope too long", func() error {
			_, err := c.ForgetRecord(ctx, &idempotencyv1.ForgetRecordRequest{Scope: []byte(strings.Repeat("s", 257)), Key: []byte("k")})
			return err
		}, "scope is 257 bytes long"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			assert.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
			assert.Contains(t, status.Convert(err).Message(), tc.want)
		})
	}

	// The token goes on with its own listing.
	next, err := c.ListRecords(ctx, &idempotencyv1.ListRecordsRequest{Scope: []byte("s"), PageSize: 5, PageToken: page.NextPageToken})
	require.NoError(t, err)
	require.Len(t, next.Records, 2)
	assert.Equal(t, "kb", string(next.Records[0].Key))
	assert.Equal(t, idempotencyv1.RecordState_RECORD_STATE_PENDING, next.Records[0].State)
	assert.Empty(t, next.NextPageToken)

	_, err = c.GetRecord(ctx, &idempotencyv1.GetRecordRequest{Scope: []byte("s"), Key: []byte("absent")})
	assert.Equal(t, codes.NotFound, status.Code(err))
	_, err = c.ForgetRecord(ctx, &idempotencyv1.ForgetRecordRequest{Scope: []byte("s"), Key: []byte("absent")})
	assert.Equal(t, codes.NotFound, status.Code(err))
	_, err = c.ForgetRecord(ctx, &idempotencyv1.ForgetRecordRequest{Scope: []byte("s"), Key: []byte("ka")})
	assert.Equal(t, codes.FailedPrecondition, status.Code(err))
	assert.Contains(t, status.Convert(err).Message(), "set force")

	stats, err := c.Stats(ctx, &idempotencyv1.StatsRequest{})
	require.NoError(t, err)
	assert.Equal(t, "memory", stats.Store)
	require.NotNil(t, stats.Pending)
	assert.Equal(t, int64(3), *stats.Pending)
}
