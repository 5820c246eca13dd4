package idempotency

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// A CallOption configures the client interceptors. The same value works at
// dial time, given to UnaryClientInterceptor or StreamClientInterceptor, and
// per call, given to the generated client method among its grpc.CallOptions;
// per-call values win.
type CallOption struct {
	grpc.EmptyCallOption
	apply func(*clientOptions)
}

type clientOptions struct {
	key            string
	noKey          bool
	replayed       *bool
	attempts       *int
	maxAttempts    int
	initialBackoff time.Duration
	maxBackoff     time.Duration
	perAttempt     time.Duration
	retryCodes     []codes.Code
	keyFields      []keyFieldRule // WithClientKeyField
	keySet         bool           // WithKey was given, even with ""
	errs           []error        // options set out of their range
}

// Defaults of the retry helper.
const (
	DefaultInitialBackoff = 50 * time.Millisecond
	DefaultMaxBackoff     = 2 * time.Second
)

// Bounds of the retry helper's durations (WithBackoff, WithPerAttemptTimeout).
const (
	MinBackoff           = time.Millisecond
	MaxBackoff           = 10 * time.Minute
	MinPerAttemptTimeout = time.Millisecond
	MaxPerAttemptTimeout = time.Hour
)

func (o *clientOptions) setDuration(name string, dst *time.Duration, d, lo, hi time.Duration) {
	switch {
	case d == 0:
	case d < lo || d > hi:
		o.errs = append(o.errs, fmt.Errorf("idempotency: %s(%v) is out of range: use %v to %v, or 0 for the default", name, d, lo, hi))
	default:
		*dst = d
	}
}

// check returns the first misuse among the call's options, as an
// InvalidArgument status, so that nothing is sent.
func (o *clientOptions) check() error {
	if len(o.errs) > 0 {
		return status.Error(codes.InvalidArgument, errors.Join(o.errs...).Error())
	}
	if o.keySet && !o.noKey {
		if err := ValidateKey(o.key); err != nil {
			return status.Errorf(codes.InvalidArgument, "idempotency: WithKey: %s", status.Convert(err).Message())
		}
	}
	if o.initialBackoff > o.maxBackoff {
		return status.Errorf(codes.InvalidArgument, "idempotency: WithBackoff: the initial backoff %v is longer than the maximum %v", o.initialBackoff, o.maxBackoff)
	}
	return nil
}

// DefaultRetryCodes are the status codes the retry helper retries: the
// ones an idempotent server answers when a retry with the same key can
// succeed.
var DefaultRetryCodes = []codes.Code{codes.Unavailable, codes.Aborted, codes.ResourceExhausted}

func defaultClientOptions() clientOptions {
	return clientOptions{
		maxAttempts:    1,
		initialBackoff: DefaultInitialBackoff,
		maxBackoff:     DefaultMaxBackoff,
		retryCodes:     DefaultRetryCodes,
	}
}

// WithKey sets the idempotency key of one logical call, instead of a fresh
// random one. Use it per call, with a key your application keeps (an order
// id, a payment intent), so that a retry after a crash of the client reuses it.
// A key the server would refuse (empty, over 255 bytes, not visible ASCII),
// or one that differs from a key already in the call's outgoing metadata,
// fails the call with InvalidArgument before anything is sent.
func WithKey(key string) CallOption {
	return CallOption{apply: func(o *clientOptions) { o.key, o.keySet, o.noKey = key, true, false }}
}

// WithClientKeyField names the request field that carries the idempotency
// key, for protos that cannot be marked with [(idempotency.v1.field).key =
// true]: the client side of the server's WithKeyField, with the same
// arguments. An empty key field of a unary or server-streaming call is
// filled with a random UUID4 instead of sending the key as metadata.
// Checked as WithKeyField is: the interceptor constructors panic on a
// misuse, and a call given it fails with InvalidArgument.
func WithClientKeyField(field string, fullMethods ...string) CallOption {
	return CallOption{apply: func(o *clientOptions) {
		r, errs := newKeyFieldRule("WithClientKeyField", field, fullMethods)
		o.errs = append(o.errs, errs...)
		if len(errs) == 0 {
			o.keyFields = append(o.keyFields[:len(o.keyFields):len(o.keyFields)], r)
		}
	}}
}

// WithoutKey sends the call without an idempotency key (and without retries,
// unless its proto declares it NO_SIDE_EFFECTS or IDEMPOTENT).
func WithoutKey() CallOption {
	return CallOption{apply: func(o *clientOptions) { o.noKey = true }}
}

// Replayed makes the call report, in *replayed, whether its answer was a
// replay of an earlier execution. For streams it is set when the first
// response (or the end of the stream) arrives.
func Replayed(replayed *bool) CallOption {
	return CallOption{apply: func(o *clientOptions) { o.replayed = replayed }}
}

// Attempts makes the call report, in *n, how many attempts it took.
func Attempts(n *int) CallOption {
	return CallOption{apply: func(o *clientOptions) { o.attempts = n }}
}

// WithMaxAttempts turns on the retry helper: a call is tried up to n times in
// all, with the same key, while it fails with a retryable code
// (DefaultRetryCodes, and DeadlineExceeded of a per-attempt timeout) and the
// caller's deadline allows. Between attempts it sleeps a random time between
// zero and an exponentially growing, capped bound (full jitter). The default,
// and what zero or less means, is 1: no retries. Retry only calls to servers
// that run the idempotency interceptor: the key is what makes a retry safe.
func WithMaxAttempts(n int) CallOption {
	return CallOption{apply: func(o *clientOptions) { o.maxAttempts = max(1, n) }}
}

// WithBackoff sets the bound of the first retry's sleep and the cap of the
// bound, which doubles with each retry. Each must be between MinBackoff (1ms)
// and MaxBackoff (10m), and initial at most maxBackoff; zero keeps the
// default, DefaultInitialBackoff and DefaultMaxBackoff. Out of range, the
// interceptor panics when given it at dial time, and the call fails with
// InvalidArgument when given it per call.
func WithBackoff(initial, maxBackoff time.Duration) CallOption {
	return CallOption{apply: func(o *clientOptions) {
		o.setDuration("WithBackoff", &o.initialBackoff, initial, MinBackoff, MaxBackoff)
		o.setDuration("WithBackoff", &o.maxBackoff, maxBackoff, MinBackoff, MaxBackoff)
	}}
}

// WithPerAttemptTimeout bounds each attempt of a unary call; an attempt that
// runs out is retried (within the caller's own deadline). It must be between
// MinPerAttemptTimeout (1ms) and MaxPerAttemptTimeout (1h); zero means no
// bound but the caller's.
func WithPerAttemptTimeout(d time.Duration) CallOption {
	return CallOption{apply: func(o *clientOptions) {
		o.setDuration("WithPerAttemptTimeout", &o.perAttempt, d, MinPerAttemptTimeout, MaxPerAttemptTimeout)
	}}
}

// WithRetryCodes replaces the status codes that are retried
// (DefaultRetryCodes).
func WithRetryCodes(cs ...codes.Code) CallOption {
	return CallOption{apply: func(o *clientOptions) { o.retryCodes = cs }}
}

// newClientOptions applies the dial-time options, and panics on a misuse:
// it is caught when the client is built, not by its first call.
func newClientOptions(opts []CallOption) clientOptions {
	o := defaultClientOptions()
	for _, opt := range opts {
		if opt.apply != nil {
			opt.apply(&o)
		}
	}
	if err := o.check(); err != nil {
		panic(status.Convert(err).Message())
	}
	// The per-call options start from these; the checks passed.
	return o
}

// split applies the idempotency options among callOpts to a copy of base
// and returns the other options.
func split(base clientOptions, callOpts []grpc.CallOption) (clientOptions, []grpc.CallOption) {
	o := base
	rest := callOpts[:0:0]
	for _, co := range callOpts {
		if ours, ok := co.(CallOption); ok {
			if ours.apply != nil {
				ours.apply(&o)
			}
			continue
		}
		rest = append(rest, co)
	}
	return o, rest
}

// clientPolicies resolves, once per method, how the methods a client calls
// take part, from their descriptors and the dial-time WithClientKeyField.
type clientPolicies struct {
	base  goPolicy
	cache sync.Map // full method name -> *methodPolicy
}

func newClientPolicies(base clientOptions) *clientPolicies {
	return &clientPolicies{base: goPolicy{keyFields: base.keyFields}}
}

// of returns the policy of method for a call with options o.
func (c *clientPolicies) of(method string, o *clientOptions) *methodPolicy {
	if len(o.keyFields) != len(c.base.keyFields) {
		// WithClientKeyField given per call: rare, so not cached.
		return resolve(method, &goPolicy{keyFields: o.keyFields})
	}
	return cachedPolicy(&c.cache, method, &c.base)
}

// withKey returns ctx with the call's idempotency key, and whether the call
// has one. req is the call's request if its key field can carry the key
// (unary and server-streaming calls), else nil.
//
// A key the caller gave (in the outgoing metadata, or with WithKey) is sent
// as metadata, to any method; a key field the caller filled, and a key in
// both the metadata and WithKey, must hold the same key. Otherwise only methods that take part get a key: in their key
// field, filled with a fresh UUID4 if empty, or else as metadata.
func (o *clientOptions) withKey(ctx context.Context, p *methodPolicy, req proto.Message) (context.Context, bool, error) {
	if o.noKey {
		return ctx, false, nil
	}
	if req != nil && !req.ProtoReflect().IsValid() {
		req = nil // a typed nil: its key field cannot be filled
	}
	fieldKey := p.requestKey(req)
	if fieldKey != "" {
		if err := validateKey(fieldKey, "request field "+p.keyFieldName()); err != nil {
			return ctx, false, err
		}
	}
	given, ok, err := keyFromOutgoing(ctx)
	if err != nil {
		// A key the server would refuse is refused here, before
		// anything is sent.
		return ctx, false, err
	}
	if o.keySet {
		if ok && given != o.key {
			return ctx, false, status.Errorf(codes.InvalidArgument, "idempotency: the call's %s metadata and WithKey hold different keys; give one key, or the same in both", KeyHeader)
		}
		given = o.key
	}
	switch {
	case given != "" || ok:
		if fieldKey != "" && fieldKey != given {
			return ctx, false, status.Errorf(codes.InvalidArgument, "idempotency: the call's key and its request field %s differ; give one key, or the same in both", p.keyFieldName())
		}
		if ok {
			return ctx, true, nil
		}
		return metadata.AppendToOutgoingContext(ctx, KeyHeader, given), true, nil
	case p.policy == Skip:
		return ctx, false, nil
	case req != nil && p.keyField != nil:
		if fieldKey == "" && !p.setRequestKey(req, newUUID4()) {
			return metadata.AppendToOutgoingContext(ctx, KeyHeader, NewKey()), true, nil
		}
		return ctx, true, nil
	default:
		return metadata.AppendToOutgoingContext(ctx, KeyHeader, NewKey()), true, nil
	}
}

func (o *clientOptions) retryable(err error, ctx, attemptCtx context.Context) bool {
	code := status.Code(err)
	if code == codes.DeadlineExceeded {
		// A per-attempt timeout ran out, not the caller's deadline. The
		// server may notice the attempt's deadline a moment before this
		// process does, so the attempt's context need not be done yet.
		return attemptCtx != ctx && ctx.Err() == nil
	}
	for _, c := range o.retryCodes {
		if c == code {
			return true
		}
	}
	return false
}

// sleep waits before retry number n (1 for the first retry). It returns
// false when the caller's context would end first, so the caller gets the
// last real error rather than a deadline of the helper's making.
func (o *clientOptions) sleep(ctx context.Context, n int) bool {
	bound := o.initialBackoff
	for i := 1; i < n && bound < o.maxBackoff; i++ {
		bound *= 2 // bounded by 2*MaxBackoff: no overflow
	}
	bound = min(bound, o.maxBackoff)
	d := time.Duration(rand.Int64N(int64(bound) + 1))
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) <= d {
		return false
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// UnaryClientInterceptor returns an interceptor that gives every call of a
// method that takes part an idempotency key, and keeps it for every retry
// of that call: its own (WithMaxAttempts), and grpc-go's retry policy and
// transparent retries, which happen below it. Which methods take part is
// read from the same descriptors as the server reads: not health checks,
// reflection or channelz, not methods declared NO_SIDE_EFFECTS or
// IDEMPOTENT or PARTICIPATION_NONE. The key is a fresh random one unless the
// call has one (in its outgoing metadata, or WithKey). A method whose
// request has a key field ([(idempotency.v1.field).key = true], or
// WithClientKeyField) gets its key there: an empty key field is filled with
// a random UUID4 in the caller's request, before the first attempt, so that
// every retry carries it; a key field the caller filled is kept. opts are
// defaults for every call; per-call options override them.
//
// It panics if an option is out of its documented range.
func UnaryClientInterceptor(opts ...CallOption) grpc.UnaryClientInterceptor {
	base := newClientOptions(opts)
	policies := newClientPolicies(base)
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, callOpts ...grpc.CallOption) error {
		o, rest := split(base, callOpts)
		if err := o.check(); err != nil {
			return err
		}
		p := policies.of(method, &o)
		if p.err != nil {
			return status.Errorf(codes.Internal, "idempotency: the idempotency policy of %s cannot be honoured: %v", method, p.err)
		}
		pm, _ := req.(proto.Message)
		ctx, keyed, err := o.withKey(ctx, p, pm)
		if err != nil {
			return err
		}
		var header metadata.MD
		if o.replayed != nil {
			rest = append(rest, grpc.Header(&header))
		}
		maxAttempts := o.maxAttempts
		if !keyed && !p.safe {
			maxAttempts = 1 // without a key, a retry is safe only if the proto says so
		}
		attempt := 0
		for {
			attempt++
			actx, cancel := ctx, context.CancelFunc(func() {})
			if o.perAttempt > 0 {
				actx, cancel = context.WithTimeout(ctx, o.perAttempt)
			}
			err = invoker(actx, method, req, reply, cc, rest...)
			retry := err != nil && attempt < maxAttempts && o.retryable(err, ctx, actx)
			cancel()
			if !retry || !o.sleep(ctx, attempt) {
				break
			}
		}
		if o.attempts != nil {
			*o.attempts = attempt
		}
		if o.replayed != nil {
			*o.replayed = IsReplayed(header)
		}
		return err
	}
}

// StreamClientInterceptor returns an interceptor that gives every stream of
// a method that takes part an idempotency key, as UnaryClientInterceptor
// does for unary calls. A server-streaming call whose request has a key
// field gets its key there (the stream is opened when its request is sent);
// client- and bidirectional-streaming calls carry their key as metadata.
// With WithMaxAttempts, a server-streaming call that fails with a retryable
// code before its first response is opened again with the same key and
// request; other streams are not retried, since their requests are not all
// known when they fail.
//
// It panics if an option is out of its documented range.
func StreamClientInterceptor(opts ...CallOption) grpc.StreamClientInterceptor {
	base := newClientOptions(opts)
	policies := newClientPolicies(base)
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, callOpts ...grpc.CallOption) (grpc.ClientStream, error) {
		o, rest := split(base, callOpts)
		if err := o.check(); err != nil {
			return nil, err
		}
		p := policies.of(method, &o)
		if p.err != nil {
			return nil, status.Errorf(codes.Internal, "idempotency: the idempotency policy of %s cannot be honoured: %v", method, p.err)
		}
		cs := &clientStream{o: o, p: p, ctx: ctx, desc: desc, cc: cc, method: method, streamer: streamer, opts: rest}
		if !desc.ClientStreams && p.keyField != nil && !o.noKey {
			// The key depends on the request: open the stream when it is
			// sent.
			cs.pending = true
			return cs, nil
		}
		if err := cs.start(nil); err != nil {
			return nil, err
		}
		return cs, nil
	}
}

// clientStream reports whether a stream was replayed, and reopens a
// server stream that failed before its first response.
type clientStream struct {
	grpc.ClientStream
	o        clientOptions
	p        *methodPolicy
	ctx      context.Context
	desc     *grpc.StreamDesc
	cc       *grpc.ClientConn
	method   string
	streamer grpc.Streamer
	opts     []grpc.CallOption

	// pending: the stream opens when its request is sent, because the
	// request's key field decides its key. startErr is why it did not.
	pending  bool
	startErr error

	retry    bool
	attempt  int
	request  proto.Message // the one request of a server stream, to resend
	closed   bool          // CloseSend was called
	received bool          // a response has arrived: no more retries
	once     sync.Once
}

// start gives the stream its key and opens it. req is the request of a
// server stream whose key field can carry the key, else nil.
func (s *clientStream) start(req proto.Message) error {
	ctx, keyed, err := s.o.withKey(s.ctx, s.p, req)
	if err != nil {
		return err
	}
	s.ctx = ctx
	s.retry = (keyed || s.p.safe) && s.o.maxAttempts > 1 && s.desc.ServerStreams && !s.desc.ClientStreams
	if err := s.open(); err != nil {
		s.report()
		return err
	}
	return nil
}

func (s *clientStream) open() error {
	for {
		s.attempt++
		cs, err := s.streamer(s.ctx, s.desc, s.cc, s.method, s.opts...)
		if err == nil {
			s.ClientStream = cs
			return nil
		}
		if !s.retry || s.attempt >= s.o.maxAttempts || !s.o.retryable(err, s.ctx, s.ctx) || !s.o.sleep(s.ctx, s.attempt) {
			return err
		}
	}
}

func (s *clientStream) SendMsg(m any) error {
	if s.pending {
		s.pending = false
		pm, ok := m.(proto.Message)
		if !ok {
			s.startErr = status.Errorf(codes.Internal, "idempotency: request type %T is not a protobuf message", m)
			return s.startErr
		}
		if err := s.start(pm); err != nil {
			s.startErr = err
			return err
		}
	}
	if s.ClientStream == nil {
		return s.notStarted()
	}
	if s.retry && s.request == nil {
		if pm, ok := m.(proto.Message); ok {
			s.request = proto.Clone(pm)
		}
	}
	return s.ClientStream.SendMsg(m)
}

// notStarted is the error of a stream that was never opened: its request
// was refused before it was sent, or is yet to be sent.
func (s *clientStream) notStarted() error {
	if s.startErr != nil {
		return s.startErr
	}
	return status.Error(codes.Internal, "idempotency: the stream opens when its request is sent; send it first")
}

func (s *clientStream) Context() context.Context {
	if s.ClientStream == nil {
		return s.ctx
	}
	return s.ClientStream.Context()
}

func (s *clientStream) Header() (metadata.MD, error) {
	if s.ClientStream == nil {
		return nil, s.notStarted()
	}
	return s.ClientStream.Header()
}

func (s *clientStream) Trailer() metadata.MD {
	if s.ClientStream == nil {
		return nil
	}
	return s.ClientStream.Trailer()
}

func (s *clientStream) CloseSend() error {
	s.closed = true
	if s.pending {
		// Closed before its request was sent: open it as it is, and let
		// the server say what it makes of a stream without a request.
		s.pending = false
		if err := s.start(nil); err != nil {
			s.startErr = err
			return err
		}
	}
	if s.ClientStream == nil {
		return s.notStarted()
	}
	return s.ClientStream.CloseSend()
}

func (s *clientStream) RecvMsg(m any) error {
	if s.ClientStream == nil {
		return s.notStarted()
	}
	for {
		err := s.ClientStream.RecvMsg(m)
		if err == nil || errors.Is(err, io.EOF) || !s.canRetry(err) {
			if err == nil {
				s.received = true
			}
			s.report()
			return err
		}
		if !s.o.sleep(s.ctx, s.attempt) {
			s.report()
			return err
		}
		if oerr := s.open(); oerr != nil {
			s.report()
			return oerr
		}
		if err := s.ClientStream.SendMsg(s.request); err != nil {
			continue // its status comes from RecvMsg
		}
		if s.closed {
			if err := s.ClientStream.CloseSend(); err != nil {
				s.report()
				return err
			}
		}
	}
}

func (s *clientStream) canRetry(err error) bool {
	return s.retry && !s.received && s.request != nil && s.attempt < s.o.maxAttempts && s.o.retryable(err, s.ctx, s.ctx)
}

// report sets the Replayed and Attempts outputs once the outcome is known.
func (s *clientStream) report() {
	s.once.Do(func() {
		if s.o.attempts != nil {
			*s.o.attempts = s.attempt
		}
		if s.o.replayed != nil && s.ClientStream != nil {
			md, _ := s.ClientStream.Header()
			*s.o.replayed = IsReplayed(md)
		}
	})
}
