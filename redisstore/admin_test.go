package redisstore_test

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/internal/admintest"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// The idempotency command's forget, through the admin service of a running
// server on a Redis store, makes the next call with the key run again; a
// running key is refused without -force.
func TestAdminCLIForget(t *testing.T) {
	c := newClient(t)
	admintest.CheckForget(t, newStore(t, c, testPrefix(t, c)))
}

// TestAdminListingStaysInItsScope: a listing of one scope through the admin
// service never shows another scope's records, whatever page token it is
// sent. The store's page token carries the keys a SCAN found beyond the
// page; the service binds the token to its scope with a tag anyone can
// compute, so a token of scope "a" re-tagged for scope "b" used to list
// scope "a"'s records (keys and outcomes) as if they were "b"'s.
func TestAdminListingStaysInItsScope(t *testing.T) {
	c := newClient(t)
	store := newStore(t, c, testPrefix(t, c))
	ctx := t.Context()
	for _, scope := range []string{"a", "b"} {
		for i := range 30 {
			key := idempotency.StoreKey(scope, fmt.Sprintf("k%02d", i))
			tok := fmt.Sprintf("%s-%d", scope, i)
			if _, err := store.Reserve(ctx, key, idempotency.Claim{Token: tok, Lease: time.Minute}); err != nil {
				t.Fatal(err)
			}
			if err := store.Complete(ctx, key, tok, []byte("record of "+scope), time.Minute); err != nil {
				t.Fatal(err)
			}
		}
	}
	admin := serveAdmin(t, store)

	retag := func(token string, scope string) string {
		b, err := base64.RawURLEncoding.DecodeString(token[1:])
		if err != nil || token[0] != '1' || len(b) <= 8 {
			t.Fatalf("the service's page token %q is not in the documented format", token)
		}
		sum := sha256.Sum256([]byte("idempotency.v1.Admin/ListRecords\x00" + idempotency.StoreKey(scope, "")))
		return "1" + base64.RawURLEncoding.EncodeToString(append(sum[:8], b[8:]...))
	}
	token, forged := "", 0
	for pages := 0; pages < 100; pages++ {
		resp, err := admin.ListRecords(ctx, &idempotencyv1.ListRecordsRequest{Scope: []byte("a"), PageSize: 1, PageToken: token})
		if err != nil {
			t.Fatalf("ListRecords(scope a): %v", err)
		}
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
		other, err := admin.ListRecords(ctx, &idempotencyv1.ListRecordsRequest{Scope: []byte("b"), PageSize: 100, PageToken: retag(token, "b")})
		if err != nil {
			continue // refusing it is as good
		}
		forged++
		for _, r := range other.GetRecords() {
			if string(r.GetScope()) != "b" {
				t.Fatalf("ListRecords(scope b) with a page token of scope a listed key %q of scope %q", r.GetKey(), r.GetScope())
			}
		}
	}
	if forged == 0 {
		t.Fatal("no re-tagged page token was accepted: the test checked nothing")
	}
}

// serveAdmin serves the admin service on store over bufconn.
func serveAdmin(t *testing.T, store idempotency.Store) idempotencyv1.AdminClient {
	t.Helper()
	svc, err := idempotency.NewAdminServer(store)
	if err != nil {
		t.Fatal(err)
	}
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer()
	idempotencyv1.RegisterAdminServer(srv, svc)
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///admin",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); srv.Stop() })
	return idempotencyv1.NewAdminClient(conn)
}
