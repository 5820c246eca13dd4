package idempotency_test

import (
	"context"
	"strconv"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
)

// BenchmarkHandRolled is the floor of an in-memory first execution on this
// machine: the least an idempotency interceptor does on a first execution
// over a memory table, measured beside BenchmarkUnary's memory/first. It
// reads the key, claims it in a locked map, runs the handler, encodes the
// response and keeps it; a replay decodes the kept response. Nothing else: no
// request fingerprint, no lease, no scope, no errors or metadata recorded, no
// wait for a running duplicate (it is refused), no observer, no expiry, and
// a panicking handler leaves its key claimed for good. It is the hand-rolled
// table a service writes before it reaches for a library, not a design to
// copy: what it leaves out is what the contract needs.
//
//	go test -run '^$' -bench 'BenchmarkHandRolled|BenchmarkUnary/(none|memory)/(baseline|keyed|first)/p1$' -count 6 .
func BenchmarkHandRolled(b *testing.B) {
	for _, mode := range []string{"first", "replay"} {
		for _, par := range []int{1, 64} {
			b.Run(mode+"/p"+strconv.Itoa(par), func(b *testing.B) {
				t := &handRolled{done: make(map[string][]byte)}
				client := serveBench(b, benchPayments{}, grpc.UnaryInterceptor(t.intercept))
				withKey := freshKeys()
				if mode == "replay" {
					replayCtx := metadata.AppendToOutgoingContext(context.Background(), idempotency.KeyHeader, "the-one-key")
					withKey = func(context.Context) context.Context { return replayCtx }
				}
				runCalls(b, client, par, withKey)
			})
		}
	}
}

// handRolled is BenchmarkHandRolled's table: a key maps to nil while its
// first execution runs, then to its encoded response.
type handRolled struct {
	mu   sync.Mutex
	done map[string][]byte
}

func (t *handRolled) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	keys := md[idempotency.KeyHeader]
	if len(keys) != 1 {
		return handler(ctx, req)
	}
	key := keys[0]
	t.mu.Lock()
	data, seen := t.done[key]
	if !seen {
		t.done[key] = nil
	}
	t.mu.Unlock()
	switch {
	case seen && data == nil:
		return nil, status.Error(codes.Aborted, "in progress")
	case seen:
		resp := new(testpb.ChargeResponse)
		if err := proto.Unmarshal(data, resp); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		return resp, nil
	}
	resp, err := handler(ctx, req)
	if err != nil {
		t.mu.Lock()
		delete(t.done, key)
		t.mu.Unlock()
		return nil, err
	}
	data, err = proto.Marshal(resp.(proto.Message))
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	t.mu.Lock()
	t.done[key] = data
	t.mu.Unlock()
	return resp, nil
}
