package idempotency

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"hash/maphash"
	mrand "math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	spb "google.golang.org/genproto/googleapis/rpc/status"

	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// A Server makes the calls of a gRPC server safe to retry: it runs a
// handler once per idempotency key and answers every duplicate from the
// stored outcome, as the package documentation describes. Its unary and
// stream interceptors share one Store and one configuration; install both
// (ServerOptions does), or streaming calls run without idempotency.
type Server struct {
	store    Store
	o        *options
	decoded  *decodedRecords
	policies sync.Map // full method name -> *methodPolicy
	leases   leaseTimers

	// streams is set once StreamServerInterceptor has been asked for;
	// until then, each service a unary call reaches is checked once for
	// streaming methods that would run unguarded (checked).
	streams atomic.Bool
	checked sync.Map // service name -> struct{}

	health health // what calls have seen of the store (Health)
}

// NewServer returns a Server that keeps its records in store. It returns an
// error if store is nil or an option is out of its documented range, so
// that a misconfiguration is caught when the server is built, not by the
// first call.
func NewServer(store Store, opts ...Option) (*Server, error) {
	if store == nil {
		return nil, errors.New("idempotency: NewServer needs a Store, got nil")
	}
	o, err := newOptions(opts)
	if err != nil {
		return nil, err
	}
	return &Server{store: store, o: o, decoded: &decodedRecords{seed: maphash.MakeSeed()}}, nil
}

// ServerOptions returns the grpc.ServerOptions that install both of the
// Server's interceptors, chained after any interceptors given before them:
//
//	grpc.NewServer(append([]grpc.ServerOption{
//		grpc.ChainUnaryInterceptor(recovery, auth),
//		grpc.ChainStreamInterceptor(recovery, auth),
//	}, idem.ServerOptions()...)...)
func (s *Server) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(s.UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(s.StreamServerInterceptor()),
	}
}

// UnaryServerInterceptor returns the interceptor for unary calls. Calls
// without a key run as if there were no interceptor, unless their method
// requires one ((idempotency.v1.method) PARTICIPATION_KEY_REQUIRED, or
// WithRequiredKey).
func (s *Server) UnaryServerInterceptor() grpc.UnaryServerInterceptor { return s.unary }

// checkStreamsGuarded logs, once per service, an error when the service of a
// unary call has streaming methods that take part while this Server's stream
// interceptor was never installed: their retries would run the handler again,
// silently.
func (s *Server) checkStreamsGuarded(fullMethod string) {
	svc, _, ok := strings.Cut(strings.TrimPrefix(fullMethod, "/"), "/")
	if !ok {
		return
	}
	if _, seen := s.checked.Load(svc); seen {
		return // the common case: no allocation
	}
	if _, seen := s.checked.LoadOrStore(svc, struct{}{}); seen {
		return
	}
	d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(svc))
	if err != nil {
		return
	}
	sd, ok := d.(protoreflect.ServiceDescriptor)
	if !ok {
		return
	}
	for i := 0; i < sd.Methods().Len(); i++ {
		md := sd.Methods().Get(i)
		if !md.IsStreamingClient() && !md.IsStreamingServer() {
			continue
		}
		name := "/" + svc + "/" + string(md.Name())
		if s.streams.Load() || s.policy(name).policy == Skip {
			continue
		}
		s.o.logger.Error("idempotency: a streaming method takes part, but this Server's StreamServerInterceptor is not installed: "+
			"retries of its calls run the handler again; install both interceptors (Server.ServerOptions)", "method", name)
		return
	}
}

// call is one keyed call, from the key's validation to its outcome.
type call struct {
	s                        *Server
	method, scope, key, skey string
	retention                time.Duration
	filter                   *requestFilter

	sum      [sha256.Size]byte // the request fingerprint's backing array
	tokenBuf [32]byte          // the owner token's backing array
	token    string            // made from tokenBuf
	rctx     lazyCtx           // the first Reserve's context
	reserved bool              // rctx was used
}

// policy returns how method takes part, resolved on its first call.
func (s *Server) policy(method string) *methodPolicy {
	return cachedPolicy(&s.policies, method, &s.o.methods)
}

// policyError is the answer to a call of a method whose declared policy
// cannot be honoured: running it unguarded could run a payment twice.
func (s *Server) policyError(method string, p *methodPolicy) error {
	s.o.logger.Error("idempotency: the method's idempotency policy cannot be honoured; call refused", "method", method, "err", p.serverErr())
	return status.Errorf(codes.Internal, "idempotency: the idempotency policy of %s cannot be honoured: %v", method, p.serverErr())
}

// prepare validates the call's key and scope. req is the call's request when
// it has been read (unary and server-streaming calls), so that a key field
// can supply the key; nil otherwise. It returns a nil call for a call that
// runs as if there were no interceptor.
func (s *Server) prepare(ctx context.Context, method string, p *methodPolicy, req proto.Message) (*call, error) {
	key, present, err := KeyFromIncoming(ctx)
	if err != nil {
		return nil, err
	}
	if fieldKey := p.requestKey(req); fieldKey != "" {
		field := p.keyFieldName()
		if err := validateKey(fieldKey, "request field "+field); err != nil {
			return nil, err
		}
		if present && key != fieldKey {
			return nil, status.Errorf(codes.InvalidArgument, "the %s metadata and request field %s hold different idempotency keys; send one of them, or the same key in both", KeyHeader, field)
		}
		key, present = fieldKey, true
	}
	if !present {
		if p.policy != Required {
			return nil, nil
		}
		if req != nil && p.keyField != nil {
			return nil, status.Errorf(codes.InvalidArgument, "%s requires an idempotency key: send %s metadata or set request field %s (1 to %d visible ASCII characters), and reuse it on every retry", method, KeyHeader, p.keyFieldName(), MaxKeyLength)
		}
		return nil, status.Errorf(codes.InvalidArgument, "%s requires %s metadata: send a unique key (1 to %d visible ASCII characters) and reuse it on every retry", method, KeyHeader, MaxKeyLength)
	}
	c := &call{s: s, method: method, key: key, retention: s.o.retention, filter: p.filter}
	if p.retention > 0 {
		c.retention = p.retention
	}
	if s.o.scope != nil {
		scope, err := s.o.scope(ctx)
		if err != nil {
			if _, ok := status.FromError(err); ok {
				return nil, err
			}
			return nil, status.Errorf(codes.Internal, "idempotency: scope of the call: %v", err)
		}
		if len(scope) > MaxScopeLength {
			c.s.o.logger.Error("idempotency: the scope of a call is too long; call refused", "method", method, "scope_bytes", len(scope), "limit", MaxScopeLength)
			return nil, status.Errorf(codes.InvalidArgument, "idempotency: the scope of this call is %d bytes; scopes of at most %d bytes can be stored", len(scope), MaxScopeLength)
		}
		c.scope = scope
	}
	c.skey = StoreKey(c.scope, key)
	return c, nil
}

// Owner tokens only need to be unique, not secret: 64 random bits per
// process and a counter.
var (
	tokenPrefix = func() string {
		var b [8]byte
		_, _ = rand.Read(b[:])
		return hex.EncodeToString(b[:]) + "-"
	}()
	tokenSeq atomic.Uint64
)

func newToken() string {
	return tokenPrefix + strconv.FormatUint(tokenSeq.Add(1), 36)
}

// newToken returns a new owner token, written into c's own array: the store
// may keep it while the lease lasts, which keeps c alive, and nothing writes
// to the array again.
func (c *call) newToken() string {
	if c.token != "" {
		return newToken()
	}
	b := strconv.AppendUint(append(c.tokenBuf[:0], tokenPrefix...), tokenSeq.Add(1), 36)
	if len(b) > len(c.tokenBuf) || &b[0] != &c.tokenBuf[0] {
		c.token = string(b) // cannot happen: 17 + 13 characters at most
	} else {
		c.token = unsafe.String(&c.tokenBuf[0], len(b))
	}
	return c.token
}

// reservation is what reserve decided: run the handler (exec is set), replay
// a record (rec is set), or run without idempotency (neither: fail-open).
type reservation struct {
	first *firstRun
	rec   *Record
	again *decodedRecord // rec's cache entry, if it was decoded before
	start time.Time      // when the call began to reserve, for event durations
	// waited is set on a replay of a record whose first execution was
	// still running when the call arrived.
	waited bool
}

// firstRun is the state of one first execution, made in one allocation when
// its key is acquired: what the handler's context, the lease renewal, the
// recording of its header and trailer, and the storing of its record would
// otherwise allocate one by one.
type firstRun struct {
	exec  Execution
	claim Claim   // what exec holds the key under
	hctx  lazyCtx // the handler's context
	sctx  lazyCtx // finish's store calls
	ts    transportRecorder
	lease leaseKeeper

	rec              Record
	ok               spb.Status // rec.Status of an OK outcome
	created, expires timestamppb.Timestamp
	responses        [1][]byte // a unary call's rec.Responses
}

// reserve claims the key for this call, waiting for a running first
// execution if needed. fp is the request fingerprint, or nil when it is known
// only after the handler has read the requests (client and bidi streams).
func (c *call) reserve(ctx context.Context, fp []byte) (reservation, error) {
	o := c.s.o
	claim := Claim{Token: c.newToken(), Fingerprint: fp, Lease: o.lease, Held: true}
	start := time.Now()
	var waitCtx context.Context
	for {
		if err := ctx.Err(); err != nil {
			if waitCtx == nil {
				return reservation{}, status.FromContextError(err).Err()
			}
			return reservation{}, c.waitEnded(ctx, start)
		}
		e, err := c.storeReserve(ctx, claim, start)
		if err != nil {
			return c.storeFailed(ctx, "reserve", err)
		}
		switch e.State {
		case Acquired:
			if ctx.Err() != nil {
				// The caller gave up while the key was being reserved:
				// nobody would get the outcome, and a retry must not
				// find the key held.
				c.release(ctx, claim.Token)
				return reservation{}, status.FromContextError(ctx.Err()).Err()
			}
			f := &firstRun{claim: claim}
			f.exec = Execution{Method: c.method, Scope: c.scope, Key: c.key, StoreKey: c.skey, Token: claim.Token}
			return reservation{first: f}, nil
		case Completed:
			rec, again, err := c.s.decoded.decode(c.skey, e.Record)
			if err != nil {
				o.logger.Error("idempotency: stored record is corrupt", "method", c.method, "key", c.key, "err", err)
				c.event(ctx, Event{Kind: EventStoreError, Code: codes.Internal, Err: err})
				return reservation{}, status.Errorf(codes.Internal, "idempotency: the record stored for this %s could not be read: %v", KeyHeader, err)
			}
			if err := c.match(ctx, rec.Method, rec.Fingerprint, fp); err != nil {
				return reservation{}, err
			}
			r := reservation{rec: rec, again: again, start: start, waited: waitCtx != nil}
			if fp != nil {
				// Otherwise the requests are compared, and the replay
				// reported, once they have been read.
				c.replayed(ctx, r)
			}
			return r, nil
		case Pending:
			if fp != nil && e.Fingerprint != nil && !bytes.Equal(fp, e.Fingerprint) {
				return reservation{}, c.mismatch(ctx, "")
			}
			if o.reject {
				c.event(ctx, Event{Kind: EventConflict, Code: codes.Aborted})
				return reservation{}, status.Errorf(codes.Aborted, "a call with this %s is still in progress; retry later with the same key to get its outcome", KeyHeader)
			}
			if waitCtx == nil {
				var cancel context.CancelFunc
				waitCtx, cancel = context.WithTimeout(ctx, o.waitTimeout)
				defer cancel()
			}
			if err := c.s.store.Wait(waitCtx, c.skey, e); err != nil {
				if waitCtx.Err() != nil {
					return reservation{}, c.waitEnded(ctx, start)
				}
				return c.storeFailed(ctx, "wait", err)
			}
		default:
			return c.storeFailed(ctx, "reserve", errors.New("store returned state "+e.State.String()))
		}
	}
}

// storeReserve runs one Reserve. It is not cut off when the caller gives up,
// only after the store timeout: a Reserve cancelled midway may have taken the
// key in the store all the same, and then nobody would release it until its
// lease ran out. If it fails, the key is released under the call's token in
// the background, in case it did take the key before failing.
func (c *call) storeReserve(ctx context.Context, claim Claim, start time.Time) (Entry, error) {
	rctx := &c.rctx
	if c.reserved {
		rctx = new(lazyCtx) // a store may still hold the first one
		start = time.Now()
	}
	c.reserved = true
	rctx.detach(ctx, start, c.s.o.storeTimeout)
	e, err := c.s.store.Reserve(rctx, c.skey, claim)
	rctx.end(nil)
	if err != nil {
		go c.release(ctx, claim.Token)
	} else {
		c.s.storeServed()
	}
	return e, err
}

// release gives up the key held under token, quietly: it is for keys the
// call may hold without having run anything.
func (c *call) release(ctx context.Context, token string) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.s.o.storeTimeout)
	defer cancel()
	if err := c.s.store.Release(rctx, c.skey, token); err != nil && !errors.Is(err, ErrNotOwner) && !errors.Is(err, ErrClosed) {
		c.s.o.logger.Warn("idempotency: releasing a key reserved for a call that did not run failed; a retry waits until its lease runs out", "method", c.method, "key", c.key, "err", err)
	}
}

// waitEnded is the answer to a duplicate whose wait ran out.
func (c *call) waitEnded(ctx context.Context, start time.Time) error {
	if errors.Is(ctx.Err(), context.Canceled) {
		return status.FromContextError(ctx.Err()).Err()
	}
	c.event(ctx, Event{Kind: EventConflict, Code: codes.Aborted, Duration: time.Since(start), Waited: true})
	return status.Errorf(codes.Aborted, "a call with this %s is still in progress after %v; retry later with the same key to get its outcome", KeyHeader, time.Since(start).Round(time.Millisecond))
}

func (c *call) storeFailed(ctx context.Context, op string, err error) (reservation, error) {
	o := c.s.o
	c.s.storeFailedHealth(err)
	if o.failOpen {
		o.logger.Warn("idempotency: store failed; running the call without idempotency (fail-open)", "op", op, "method", c.method, "key", c.key, "err", err)
		c.event(ctx, Event{Kind: EventFailOpen, Err: err})
		return reservation{}, nil
	}
	o.logger.Error("idempotency: store failed; call refused (fail-closed)", "op", op, "method", c.method, "key", c.key, "err", err)
	c.event(ctx, Event{Kind: EventStoreError, Code: codes.Unavailable, Err: err})
	return reservation{}, status.Errorf(codes.Unavailable, "idempotency store unavailable (%s: %v); the call did not run, retry with the same %s", op, err, KeyHeader)
}

// match checks that a stored record answers this request. want is nil when
// the request's fingerprint is not known yet (it is checked after reading).
func (c *call) match(ctx context.Context, method string, got, want []byte) error {
	if method != c.method {
		return c.mismatch(ctx, method)
	}
	if want != nil && !bytes.Equal(got, want) {
		return c.mismatch(ctx, "")
	}
	return nil
}

func (c *call) replayed(ctx context.Context, r reservation) {
	code := codes.Code(r.rec.GetStatus().GetCode())
	if r.rec.Omitted != "" {
		code = codes.FailedPrecondition
	}
	c.event(ctx, Event{Kind: EventReplayed, Code: code, Duration: time.Since(r.start), Waited: r.waited})
}

func (c *call) mismatch(ctx context.Context, otherMethod string) error {
	c.event(ctx, Event{Kind: EventMismatch, Code: codes.FailedPrecondition})
	if otherMethod != "" {
		return status.Errorf(codes.FailedPrecondition, "this %s was already used for %s; use a new key for a new request", KeyHeader, otherMethod)
	}
	return status.Errorf(codes.FailedPrecondition, "this %s was already used for a different request to %s; use a new key for a new request", KeyHeader, c.method)
}

func (c *call) event(ctx context.Context, e Event) {
	if len(c.s.o.observers) == 0 {
		return
	}
	e.Method, e.Scope, e.Key = c.method, c.scope, c.key
	for _, observe := range c.s.o.observers {
		observe(ctx, e)
	}
}

// leaseKeeper renews the lease of a running first execution every third of
// its length, until stop is called; stop waits for a renewal under way, so
// that none lands after the outcome is saved or the key released. If another
// owner has taken the key (the lease ran out during a pause, and a shared
// store handed the key to a duplicate), the handler's context is cancelled
// with ErrLeaseLost.
type leaseKeeper struct {
	c        *call
	ctx      context.Context
	f        *firstRun
	every    time.Duration
	mu       sync.Mutex
	stopped  bool
	inFlight sync.WaitGroup
	next     time.Time // when the renewal is due, in c.s.leases
	index    int       // in c.s.leases's heap; -1 when not in it
	// retryIn is how soon a failed renewal is tried again: soon, as a
	// renewal cut off by a pause of the process (its deadline passed while
	// stopped) must take the key back before a duplicate can.
	retryIn time.Duration
}

// keepLease starts renewing f's lease; ctx is the handler's context.
func (c *call) keepLease(ctx context.Context, f *firstRun, now time.Time) *leaseKeeper {
	l := &f.lease
	l.c, l.ctx, l.f = c, ctx, f
	l.every = c.s.o.lease / 3
	l.retryIn = min(l.every, renewRetryMin)
	l.mu.Lock()
	l.next = now.Add(l.every)
	c.s.leases.add(l)
	l.mu.Unlock()
	return l
}

func (l *leaseKeeper) renew() {
	c, o := l.c, l.c.s.o
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return
	}
	l.inFlight.Add(1)
	l.mu.Unlock()
	defer l.inFlight.Done()

	rctx, cancel := context.WithTimeout(context.WithoutCancel(l.ctx), o.lease)
	err := c.s.store.Renew(rctx, c.skey, l.f.claim)
	cancel()
	switch {
	case err == nil:
	case errors.Is(err, ErrNotOwner):
		o.logger.Error("idempotency: the lease was lost to another owner while the handler ran; its context is cancelled and its outcome will not be stored",
			"method", c.method, "key", c.key)
		c.event(l.ctx, Event{Kind: EventStoreError, Code: codes.Aborted, Err: ErrLeaseLost})
		l.f.exec.loseLease()
		return
	case errors.Is(err, ErrClosed):
		return
	default:
		o.logger.Warn("idempotency: lease renewal failed; retrying", "method", c.method, "key", c.key, "err", err)
		c.event(l.ctx, Event{Kind: EventStoreError, Err: err})
	}
	next := l.every
	if err != nil {
		next, l.retryIn = l.retryIn, min(2*l.retryIn, l.every)
	} else {
		l.retryIn = min(l.every, renewRetryMin)
	}
	l.mu.Lock()
	if !l.stopped {
		l.next = time.Now().Add(next)
		c.s.leases.add(l)
	}
	l.mu.Unlock()
}

func (l *leaseKeeper) stop() {
	l.mu.Lock()
	l.stopped = true
	l.c.s.leases.remove(l)
	l.mu.Unlock()
	l.inFlight.Wait()
}

// renewRetryMin is the first delay before a failed renewal is tried again; it
// doubles up to a third of the lease.
const renewRetryMin = 20 * time.Millisecond

// handlerContext returns the context a first execution's handler runs in: it
// carries f's Execution, and is cancelled with ErrLeaseLost if the lease is
// lost. f.hctx.end must be called once the handler has returned.
func (f *firstRun) handlerContext(ctx context.Context) context.Context {
	f.hctx.child(ctx, &f.exec)
	f.exec.cancel = &f.hctx
	return &f.hctx
}

// run runs a first execution's handler under its lease and returns how long
// it ran. If the handler panics (or calls runtime.Goexit), its outcome is
// unknown: run releases the key, so that a retry can run again, and lets the
// panic go on to the recovery interceptor outside, with its stack intact.
func (c *call) run(ctx context.Context, f *firstRun, handler func()) time.Duration {
	start := time.Now()
	lease := c.keepLease(ctx, f, start)
	returned := false
	defer func() {
		lease.stop()
		if returned {
			return
		}
		o := c.s.o
		o.logger.Error("idempotency: handler panicked; key released, so a retry runs again", "method", c.method, "key", c.key)
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.storeTimeout)
		defer cancel()
		if err := c.s.store.Release(sctx, c.skey, f.exec.Token); err != nil {
			o.logger.Error("idempotency: releasing the key failed; a retry waits until its lease runs out", "method", c.method, "key", c.key, "err", err)
			c.event(ctx, Event{Kind: EventStoreError, Code: codes.Internal, Err: err})
		}
		c.event(ctx, Event{Kind: EventExecuted, Code: codes.Internal, Duration: time.Since(start), Err: errHandlerPanicked})
	}()
	handler()
	returned = true
	return time.Since(start)
}

var errHandlerPanicked = errors.New("the handler panicked")

// finish stores or releases the outcome of a first execution that ran for
// ran, and reports it (EventExecuted). ctx is the handler's context; store
// calls outlive its cancellation, and are retried within the store timeout.
// It returns the error that replaces the handler's outcome, which is nil
// unless the store rolled the handler's own writes back.
func (c *call) finish(ctx context.Context, f *firstRun, cacheable bool, overflow error, ran time.Duration) error {
	o := c.s.o
	exec, rec := &f.exec, &f.rec
	now := time.Now()
	f.sctx.detach(ctx, now, o.storeTimeout)
	sctx := &f.sctx
	defer sctx.end(nil)
	code := codes.Code(rec.GetStatus().GetCode())
	var data []byte
	var tooLarge int // the size of a record over the limit
	if cacheable {
		rec.Method = c.method
		rec.CreatedAt = setTimestamp(&f.created, now)
		rec.ExpiresAt = setTimestamp(&f.expires, now.Add(c.retention))
		if overflow == nil {
			var err error
			if data, err = marshalRecord(rec); err != nil {
				overflow = err
			} else if len(data) > o.maxRecordSize {
				tooLarge = len(data)
				overflow = fmt.Errorf("record of %d bytes exceeds the limit of %d (WithMaxRecordSize)", len(data), o.maxRecordSize)
			}
		}
		if overflow != nil {
			c.event(ctx, Event{Kind: EventRecordTooLarge, Code: code, Err: overflow, Size: tooLarge})
			if o.rerunOversized {
				o.logger.Warn("idempotency: outcome too large to store; key released, so a retry runs again (WithRerunOversized)", "method", c.method, "key", c.key, "err", overflow)
				cacheable = false
			} else {
				o.logger.Warn("idempotency: outcome too large to store; the key keeps a status-only record, so a duplicate gets FailedPrecondition instead of running again",
					"method", c.method, "key", c.key, "err", overflow)
				data = statusOnly(rec, overflow)
			}
		}
	}
	var err error
	if cacheable {
		err = c.retry(sctx, "complete", func(ctx context.Context) error {
			return c.s.store.Complete(ctx, c.skey, exec.Token, data, c.retention)
		})
		switch {
		case err == nil:
			c.s.storeServed()
		case errors.Is(err, ErrRolledBack):
			// Nothing happened, so nothing may hold the retry back. The
			// key is ours unless the lease was lost, when this fails
			// harmlessly with ErrNotOwner.
			o.logger.Warn("idempotency: the handler's transaction was rolled back with its record; the caller gets Aborted and may retry", "method", c.method, "key", c.key, "err", err)
			c.event(ctx, Event{Kind: EventStoreError, Code: codes.Aborted, Err: err})
			cacheable = false
		case errors.Is(err, ErrNotOwner):
			o.logger.Error("idempotency: outcome not stored: another owner took the key after this call's lease ran out, and ran the call too",
				"method", c.method, "key", c.key, "err", err)
			c.event(ctx, Event{Kind: EventStoreError, Code: code, Err: fmt.Errorf("%w: %w", ErrLeaseLost, err)})
		default:
			// Releasing the key would let a retry run the handler again
			// at once. Held, it makes duplicates wait or get Aborted
			// until its lease runs out.
			o.logger.Error("idempotency: outcome not stored after retrying; the caller gets it, and the key stays held until its lease runs out",
				"method", c.method, "key", c.key, "lease", o.lease, "err", err)
			c.s.storeFailedHealth(err)
			c.event(ctx, Event{Kind: EventStoreError, Code: code, Err: err})
		}
	}
	if !cacheable {
		rerr := c.retry(sctx, "release", func(ctx context.Context) error {
			return c.s.store.Release(ctx, c.skey, exec.Token)
		})
		if rerr != nil && !errors.Is(rerr, ErrNotOwner) {
			o.logger.Error("idempotency: releasing the key failed; a retry waits until its lease runs out", "method", c.method, "key", c.key, "err", rerr)
			c.event(ctx, Event{Kind: EventStoreError, Code: code, Err: rerr})
		}
	}
	stored := cacheable && err == nil
	size := 0
	if stored {
		size = len(data)
	}
	c.event(ctx, Event{Kind: EventExecuted, Code: code, Stored: stored, Duration: ran, Size: size})
	if errors.Is(err, ErrRolledBack) {
		return status.Errorf(codes.Aborted, "the call's transaction was rolled back, so it had no effect (%v); retry with the same %s", err, KeyHeader)
	}
	return nil
}

// setStatus sets rec's status to a handler's error (nil for OK) and returns
// its code. An error that is not a status is converted as grpc-go converts
// it for the caller: a context error (or one wrapping it) is Canceled or
// DeadlineExceeded, anything else Unknown. A message that is not valid
// UTF-8 cannot be a protobuf string: the record keeps it with each invalid
// byte replaced by U+FFFD, which is what the first caller got too (grpc-go
// and connect-go send it so).
func setStatus(rec *Record, err error) codes.Code {
	st, ok := status.FromError(err)
	if !ok {
		st = status.FromContextError(err)
	}
	p := st.Proto()
	if p != nil && !utf8.ValidString(p.Message) {
		p.Message = strings.ToValidUTF8(p.Message, "\uFFFD")
	}
	rec.Status = p
	return st.Code()
}

// setTimestamp sets ts to t, as timestamppb.New would make it, and returns it.
func setTimestamp(ts *timestamppb.Timestamp, t time.Time) *timestamppb.Timestamp {
	ts.Seconds, ts.Nanos = t.Unix(), int32(t.Nanosecond())
	return ts
}

// statusOnly is the record kept for an outcome too large to store: the
// request's fingerprint and the status code, with why the rest is missing.
func statusOnly(rec *Record, why error) []byte {
	msg := rec.GetStatus().GetMessage()
	if len(msg) > 1024 {
		// Cut where a character starts: a string field must stay UTF-8.
		cut := 1024
		for cut > 0 && !utf8.RuneStart(msg[cut]) {
			cut--
		}
		msg = msg[:cut]
	}
	data, _ := proto.Marshal(&Record{
		Method:         rec.Method,
		Fingerprint:    rec.Fingerprint,
		Status:         &spb.Status{Code: rec.GetStatus().GetCode(), Message: msg},
		CreatedAt:      rec.CreatedAt,
		ExpiresAt:      rec.ExpiresAt,
		RequestsRead:   rec.RequestsRead,
		RequestsClosed: rec.RequestsClosed,
		Omitted:        strings.ToValidUTF8(why.Error(), "\uFFFD"),
	})
	return data
}

// omittedError is the answer to a duplicate of a call whose outcome was too
// large to store.
func omittedError(rec *Record) error {
	return status.Errorf(codes.FailedPrecondition,
		"idempotency: this %s was already used for a call that ran, but its outcome was too large to store (%s), so it cannot be replayed; "+
			"use a new key to run the call again (the server can raise WithMaxRecordSize or WithMaxStreamMessages)",
		KeyHeader, rec.Omitted)
}

// retry runs op until it succeeds, fails for good (ErrNotOwner,
// ErrRolledBack, ErrClosed, ErrKeyTooLong), or ctx ends, with capped
// exponential backoff and jitter between attempts. It returns op's last error.
func (c *call) retry(ctx context.Context, what string, op func(context.Context) error) error {
	backoff := 5 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := op(ctx)
		if err == nil || errors.Is(err, ErrNotOwner) || errors.Is(err, ErrRolledBack) ||
			errors.Is(err, ErrClosed) || errors.Is(err, ErrKeyTooLong) {
			return err
		}
		wait := backoff/2 + mrand.N(backoff/2+1)
		if d, ok := ctx.Deadline(); ok && time.Until(d) < wait {
			return err
		}
		c.s.o.logger.Warn("idempotency: store call failed; retrying", "op", what, "attempt", attempt, "method", c.method, "key", c.key, "err", err)
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return err
		}
		backoff = min(2*backoff, time.Second)
	}
}

func (s *Server) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !s.streams.Load() {
		s.checkStreamsGuarded(info.FullMethod)
	}
	p := s.policy(info.FullMethod)
	switch {
	case p.serverErr() != nil:
		return nil, s.policyError(info.FullMethod, p)
	case p.policy == Skip:
		return handler(ctx, req)
	}
	pm, _ := req.(proto.Message)
	c, err := s.prepare(ctx, info.FullMethod, p, pm)
	if c == nil {
		if err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
	fp := newFingerprint(info.FullMethod, c.filter)
	err = fp.add(req)
	sum := fp.sumInto(c.sum[:0])
	fp.release()
	if err != nil {
		return nil, err
	}
	r, err := c.reserve(ctx, sum)
	switch {
	case err != nil:
		return nil, err
	case r.rec != nil:
		return c.replayUnary(ctx, r.rec, r.again)
	case r.first == nil:
		return handler(ctx, req) // fail-open
	}

	f := r.first
	ts := &f.ts
	ts.ServerTransportStream, ts.client = grpc.ServerTransportStreamFromContext(ctx), ctx
	hctx := f.handlerContext(ctx)
	defer f.hctx.end(nil)
	if ts.ServerTransportStream != nil {
		hctx = grpc.NewContextWithServerTransportStream(hctx, ts)
	}
	var resp any
	var herr error
	ran := c.run(hctx, f, func() { resp, herr = handler(hctx, req) })

	rec := &f.rec
	rec.Fingerprint = sum
	code := codes.OK
	// The response is copied into the marshalled record, so its own
	// encoding can go into a buffer used again.
	buf := responseBufs.Get().(*[]byte)
	defer putResponseBuf(buf)
	var overflow error
	if herr == nil {
		rec.Status = &f.ok
		m, ok := resp.(proto.Message)
		if !ok {
			overflow = errors.New("response is not a protobuf message")
		} else if b, err := (proto.MarshalOptions{}).MarshalAppend((*buf)[:0], m); err != nil {
			overflow = err
		} else {
			*buf = b
			f.responses[0] = b
			rec.Responses = f.responses[:]
		}
	} else if code = setStatus(rec, herr); code == codes.OK {
		// An error whose status is OK: grpc-go sends that status with no
		// response, and the caller gets Internal.
		code = setStatus(rec, status.Errorf(codes.Internal, "idempotency: the handler returned an error whose status is OK, and no response: %v", herr))
	}
	rec.Header, rec.Trailer = ts.recorded()
	err = c.finish(hctx, f, s.o.isCacheable(code), overflow, ran)
	rec.Responses, f.responses[0] = nil, nil // buf goes back to the pool
	if err != nil {
		return nil, err
	}
	return resp, herr
}

var responseBufs = sync.Pool{New: func() any { return new([]byte) }}

func putResponseBuf(b *[]byte) {
	if cap(*b) > 64<<10 {
		*b = nil // keep the pool small
	}
	responseBufs.Put(b)
}

func (c *call) replayUnary(ctx context.Context, rec *Record, again *decodedRecord) (any, error) {
	var header, trailer metadata.MD
	var decoded proto.Message
	if u := unaryReplayOf(again, c.method); u != nil {
		header, trailer, decoded = u.header, u.trailer, u.resp
	} else {
		header, trailer = replayHeader(rec), replayTrailer(rec)
	}
	if err := grpc.SetHeader(ctx, header); err != nil {
		return nil, err
	}
	if rec.Omitted != "" {
		return nil, omittedError(rec)
	}
	if trailer != nil {
		if err := grpc.SetTrailer(ctx, trailer); err != nil {
			return nil, err
		}
	}
	if rec.GetStatus().GetCode() != int32(codes.OK) {
		return nil, status.ErrorProto(rec.Status)
	}
	if len(rec.Responses) != 1 {
		return nil, status.Errorf(codes.Internal, "idempotency: the record stored for this %s holds %d responses, not 1", KeyHeader, len(rec.Responses))
	}
	t, err := typesOf(c.method)
	if err != nil {
		// The method is not in the protobuf registry (a hand-written
		// ServiceDesc, a proxy), so its response type is unknown here.
		return rawResponse(rec.Responses[0]), nil
	}
	resp, err := replayResponse(t.out, rec.Responses[0], decoded)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "idempotency: the response stored for this %s could not be read: %v", KeyHeader, err)
	}
	return resp, nil
}

// rawResponse returns a message whose encoding is b, byte for byte: an
// empty message holding b as its unknown fields, which protobuf encodes as
// they are. It answers a replay of a method whose response type is not in
// the protobuf registry; the client decodes it into its own type.
func rawResponse(b []byte) proto.Message {
	m := new(emptypb.Empty)
	m.ProtoReflect().SetUnknown(protoreflect.RawFields(bytes.Clone(b)))
	return m
}

func replayHeader(rec *Record) metadata.MD {
	if len(rec.Header) == 0 {
		return replayedOnly
	}
	md := mdFromRecord(rec.Header, 1)
	md[ReplayedHeader] = replayedTrue
	return md
}

// replayTrailer returns a new trailer for a replay of rec, nil if its first
// execution set none.
func replayTrailer(rec *Record) metadata.MD {
	if len(rec.Trailer) == 0 {
		return nil
	}
	return mdFromRecord(rec.Trailer, 0)
}

// replayedOnly is the header of a replay whose first execution set none.
// grpc-go copies the metadata it is given (metadata.Join), and so does this
// package's transportRecorder; nothing writes to these.
var (
	replayedTrue = []string{"true"}[:1:1]
	replayedOnly = metadata.MD{ReplayedHeader: replayedTrue}
)

// transportRecorder records the header and trailer metadata a handler sets
// through grpc.SetHeader, grpc.SendHeader and grpc.SetTrailer, and passes
// them on, unless the client has gone: then they are recorded, not failed,
// so that a handler that runs to its end after its client left keeps its
// whole outcome for the client's retry to replay.
type transportRecorder struct {
	grpc.ServerTransportStream
	client          context.Context
	mu              sync.Mutex
	header, trailer metadata.MD
}

func (r *transportRecorder) SetHeader(md metadata.MD) error {
	md = withoutReplayed(md)
	if err := unlessGone(r.client, func() error { return r.ServerTransportStream.SetHeader(md) }); err != nil {
		return err
	}
	r.addHeader(md)
	return nil
}

func (r *transportRecorder) SendHeader(md metadata.MD) error {
	md = withoutReplayed(md)
	if err := unlessGone(r.client, func() error { return r.ServerTransportStream.SendHeader(md) }); err != nil {
		return err
	}
	r.addHeader(md)
	return nil
}

func (r *transportRecorder) SetTrailer(md metadata.MD) error {
	if err := unlessGone(r.client, func() error { return r.ServerTransportStream.SetTrailer(md) }); err != nil {
		return err
	}
	r.addTrailer(md)
	return nil
}

func (r *transportRecorder) addHeader(md metadata.MD) {
	r.mu.Lock()
	r.header = metadata.Join(r.header, md)
	r.mu.Unlock()
}

func (r *transportRecorder) recorded() (header, trailer []*idempotencyv1.Metadata) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return mdToRecord(r.header), mdToRecord(r.trailer)
}
