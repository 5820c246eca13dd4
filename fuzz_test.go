package idempotency_test

import (
	"context"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"

	"github.com/grpcidem/idempotency/memstore"
)

// FuzzKey feeds arbitrary key metadata to the server interceptor: it must
// accept exactly the keys the contract allows, run the handler only for them,
// and never panic.
func FuzzKey(f *testing.F) {
	for _, s := range []string{"", "k", "order-42", "a b", "clé", "\x00", "\x7f", string(make([]byte, 300))} {
		f.Add(s)
	}
	store := memstore.New()
	unary := mustServer(store).UnaryServerInterceptor()
	info := &grpc.UnaryServerInfo{FullMethod: testpb.PaymentService_Charge_FullMethodName}
	f.Fuzz(func(t *testing.T, key string) {
		valid := len(key) >= 1 && len(key) <= 255
		for i := 0; i < len(key); i++ {
			if key[i] < 0x21 || key[i] > 0x7e {
				valid = false
			}
		}
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(idempotency.KeyHeader, key))
		ctx = grpc.NewContextWithServerTransportStream(ctx, nopTransport{})
		ran := false
		_, err := unary(ctx, &testpb.ChargeRequest{Account: key}, info, func(context.Context, any) (any, error) {
			ran = true
			return &testpb.ChargeResponse{}, nil
		})
		if valid != (idempotency.ValidateKey(key) == nil) {
			t.Fatalf("ValidateKey(%q) disagrees with the contract", key)
		}
		if !valid && (status.Code(err) != codes.InvalidArgument || ran) {
			t.Fatalf("key %q: err %v, ran %v; want InvalidArgument without running", key, err, ran)
		}
		if valid && err != nil && status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("key %q: %v", key, err)
		}
	})
}

// FuzzStoredRecord feeds arbitrary bytes to a replay as if a store returned
// them: a corrupt record must give a clear Internal error, never a panic.
func FuzzStoredRecord(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0x0a, 0x05, 'h', 'e', 'l', 'l', 'o'})
	f.Add([]byte{0x32, 0x02, 0x08, 0x01})
	info := &grpc.UnaryServerInfo{FullMethod: testpb.PaymentService_Charge_FullMethodName}
	f.Fuzz(func(t *testing.T, data []byte) {
		store := corruptStore{data: data}
		unary := mustServer(store).UnaryServerInterceptor()
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(idempotency.KeyHeader, "k"))
		ctx = grpc.NewContextWithServerTransportStream(ctx, nopTransport{})
		_, err := unary(ctx, &testpb.ChargeRequest{}, info, func(context.Context, any) (any, error) {
			t.Fatal("the handler must not run for a completed key")
			return nil, nil
		})
		_ = err // any status is acceptable; a panic or a run is not
	})
}

type corruptStore struct {
	idempotency.Store // nil: only Reserve is called
	data              []byte
}

func (s corruptStore) Reserve(context.Context, string, idempotency.Claim) (idempotency.Entry, error) {
	return idempotency.Entry{State: idempotency.Completed, Record: s.data}, nil
}

type nopTransport struct{}

func (nopTransport) Method() string                  { return testpb.PaymentService_Charge_FullMethodName }
func (nopTransport) SetHeader(md metadata.MD) error  { return nil }
func (nopTransport) SendHeader(md metadata.MD) error { return nil }
func (nopTransport) SetTrailer(md metadata.MD) error { return nil }

// FuzzStoreKey checks that no two (scope, key) pairs share a store key, by
// splitting it back.
func FuzzStoreKey(f *testing.F) {
	f.Add("", "k")
	f.Add("tenant-a", "order/42")
	f.Add("a/b", "c")
	f.Add("%2F", "x")
	f.Add("é\x00", "k%")
	f.Fuzz(func(t *testing.T, scope, key string) {
		sk := idempotency.StoreKey(scope, key)
		s, k, ok := idempotency.SplitStoreKey(sk)
		if !ok || s != scope || k != key {
			t.Fatalf("StoreKey(%q, %q) = %q splits into %q, %q, %v", scope, key, sk, s, k, ok)
		}
	})
}
