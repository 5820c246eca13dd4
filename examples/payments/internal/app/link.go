package app

import (
	"context"
	"errors"
	"io"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency"
)

// errAnswerLost is what a client sees when the link loses an answer.
var errAnswerLost = status.Error(codes.Unavailable, "demo link: the answer was lost on the way back, after the server ran the call")

// link stands for an unreliable network between the demo's clients and its
// server. It sits below the idempotency client interceptor, where the wire
// is, and loses the answer of every dropEvery-th call after the server has
// run it to the end: the worst moment, when the payment is made but the
// client cannot know. It loses a key's answer once at most, so that every
// payment gets through within its attempts. It also counts the calls that
// cross it: the attempts.
type link struct {
	dropEvery int

	mu      sync.Mutex
	calls   int
	dropped map[string]bool // keys whose answer was lost
	stats   map[string]*linkStats
}

type linkStats struct{ attempts, dropped int }

func newLink(dropEvery int) *link {
	return &link{dropEvery: dropEvery, dropped: make(map[string]bool), stats: make(map[string]*linkStats)}
}

func (l *link) statsOf(method string) linkStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	if s := l.stats[method]; s != nil {
		return *s
	}
	return linkStats{}
}

// begin counts a call and decides whether its answer will be lost.
func (l *link) begin(ctx context.Context, method string) (drop bool, key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.stats[method]
	if s == nil {
		s = new(linkStats)
		l.stats[method] = s
	}
	s.attempts++
	l.calls++
	md, _ := metadata.FromOutgoingContext(ctx)
	if v := md.Get(idempotency.KeyHeader); len(v) == 1 {
		key = v[0]
	}
	if l.dropEvery <= 0 || l.calls%l.dropEvery != 0 || key == "" || l.dropped[key] {
		return false, key
	}
	l.dropped[key] = true
	return true, key
}

// lost reports whether the answer of a call that begin chose was lost. An
// answer that was an error anyway is let through, and its key may be
// chosen again.
func (l *link) lost(method, key string, answered bool) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !answered {
		delete(l.dropped, key)
		return false
	}
	l.stats[method].dropped++
	return true
}

func (l *link) unary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	drop, key := l.begin(ctx, method)
	err := invoker(ctx, method, req, reply, cc, opts...)
	if drop && l.lost(method, key, err == nil) {
		return errAnswerLost
	}
	return err
}

func (l *link) stream(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	drop, key := l.begin(ctx, method)
	cs, err := streamer(ctx, desc, cc, method, opts...)
	if err != nil {
		if drop {
			l.lost(method, key, false)
		}
		return nil, err
	}
	if !drop {
		return cs, nil
	}
	return &lossyStream{ClientStream: cs, l: l, method: method, key: key, desc: desc}, nil
}

// lossyStream loses the end of a stream that completed: its answers are
// delivered (a server stream's are read, then thrown away), then the client
// gets Unavailable instead of the OK status.
type lossyStream struct {
	grpc.ClientStream
	l           *link
	method, key string
	desc        *grpc.StreamDesc
	done        bool
	// A server stream's answers, read ahead to learn how it ends; they are
	// handed out only if it ended in an error.
	ahead []proto.Message
	end   error
	read  bool
}

func (s *lossyStream) RecvMsg(m any) error {
	if s.done {
		return s.ClientStream.RecvMsg(m)
	}
	switch {
	case s.desc.ServerStreams && !s.desc.ClientStreams:
		return s.recvServerStream(m)
	case !s.desc.ServerStreams:
		// One answer, which the client reads with the status.
		err := s.ClientStream.RecvMsg(m)
		s.done = true
		if s.l.lost(s.method, s.key, err == nil) {
			return errAnswerLost
		}
		return err
	default:
		err := s.ClientStream.RecvMsg(m)
		if err == nil {
			return nil
		}
		s.done = true
		if s.l.lost(s.method, s.key, errors.Is(err, io.EOF)) {
			return errAnswerLost
		}
		return err
	}
}

// recvServerStream reads the whole stream at the first RecvMsg, as a link
// would deliver it before failing, so that the server has finished when the
// client sees the loss: it is the client interceptor's own retry of a
// server stream (before its first answer) that gets the replay.
func (s *lossyStream) recvServerStream(m any) error {
	if !s.read {
		s.read = true
		pm, ok := m.(proto.Message)
		if !ok {
			s.done = true
			s.l.lost(s.method, s.key, false)
			return s.ClientStream.RecvMsg(m)
		}
		for {
			next := pm.ProtoReflect().New().Interface()
			if s.end = s.ClientStream.RecvMsg(next); s.end != nil {
				break
			}
			s.ahead = append(s.ahead, next)
		}
		if s.l.lost(s.method, s.key, errors.Is(s.end, io.EOF)) {
			s.ahead, s.end = nil, errAnswerLost
		}
	}
	if len(s.ahead) > 0 {
		proto.Reset(m.(proto.Message))
		proto.Merge(m.(proto.Message), s.ahead[0])
		s.ahead = s.ahead[1:]
		return nil
	}
	return s.end
}
