package idempotency

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"

	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// An Option configures the server interceptors.
type Option func(*options)

// Policy says how a method takes part in idempotency, as WithPolicy decides
// it for methods whose proto does not.
type Policy uint8

const (
	// Skip: the method runs as if there were no interceptor, key or not.
	Skip Policy = iota
	// Optional: calls with a key run once per key; calls without one run as
	// if there were no interceptor. The default for every method.
	Optional
	// Required: calls without a key are refused with InvalidArgument.
	Required
)

type options struct {
	scope          func(context.Context) (string, error)
	retention      time.Duration
	lease          time.Duration
	waitTimeout    time.Duration
	reject         bool
	cacheable      [32]bool // indexed by code; codes above 31 are never cached
	methods        goPolicy
	failOpen       bool
	maxRecordSize  int
	maxStreamMsgs  int
	rerunOversized bool
	storeTimeout   time.Duration
	logger         *slog.Logger
	observers      []func(context.Context, Event)
	errs           []error // options set out of their range
}

// Defaults, as documented on each option.
const (
	DefaultRetention         = 24 * time.Hour
	DefaultLease             = 10 * time.Second
	DefaultWaitTimeout       = 30 * time.Second
	DefaultMaxRecordSize     = 4 << 20
	DefaultMaxStreamMessages = 1024
	DefaultStoreTimeout      = 10 * time.Second
)

// Bounds of the duration options. A value outside them is refused when the
// interceptors are made; zero keeps the default. Every store converts every
// value within them without overflow.
const (
	// A lease is renewed every third of its length, so a shorter one would
	// be lost to a garbage collection pause or a slow store round trip.
	MinLease = time.Second
	// A longer lease would hold the key of a crashed replica's call, on a
	// shared store, for longer than any caller waits.
	MaxLease = time.Hour
	// MinRetention and MaxRetention bound WithRetention: ten years is far
	// beyond any retry, and well within what every store can represent.
	MinRetention = 10 * time.Millisecond
	MaxRetention = 10 * 365 * 24 * time.Hour
	// MinWaitTimeout and MaxWaitTimeout bound WithWaitTimeout.
	MinWaitTimeout = time.Millisecond
	MaxWaitTimeout = time.Hour
	// MinStoreTimeout and MaxStoreTimeout bound WithStoreTimeout.
	MinStoreTimeout = 10 * time.Millisecond
	MaxStoreTimeout = 10 * time.Minute
)

// setDuration sets *dst to d if d is within [lo, hi], keeps the default if d
// is zero, and records an error otherwise.
func (o *options) setDuration(name string, dst *time.Duration, d, lo, hi time.Duration) {
	switch {
	case d == 0:
	case d < lo || d > hi:
		o.errs = append(o.errs, fmt.Errorf("idempotency: %s(%v) is out of range: use %v to %v, or 0 for the default", name, d, lo, hi))
	default:
		*dst = d
	}
}

// DefaultCacheableCodes are the outcomes stored and replayed by default: the
// ones a retry of the same request would get again. Every other code releases
// the key, so that a retry runs the handler again.
var DefaultCacheableCodes = []codes.Code{
	codes.OK, codes.InvalidArgument, codes.NotFound, codes.AlreadyExists,
	codes.FailedPrecondition, codes.OutOfRange, codes.Unimplemented,
}

func newOptions(opts []Option) (*options, error) {
	o := &options{
		retention:     DefaultRetention,
		lease:         DefaultLease,
		waitTimeout:   DefaultWaitTimeout,
		maxRecordSize: DefaultMaxRecordSize,
		maxStreamMsgs: DefaultMaxStreamMessages,
		storeTimeout:  DefaultStoreTimeout,
		logger:        slog.Default(),
	}
	for _, c := range DefaultCacheableCodes {
		o.cacheable[c] = true
	}
	for _, opt := range opts {
		if opt != nil {
			opt(o)
		}
	}
	if err := checkDeclared(protoregistry.GlobalFiles); err != nil {
		o.errs = append(o.errs, err)
	}
	if err := errors.Join(o.errs...); err != nil {
		return nil, err
	}
	return o, nil
}

func (o *options) isCacheable(c codes.Code) bool {
	return int(c) < len(o.cacheable) && o.cacheable[c]
}

// WithScope sets the function that gives each call its scope: the tenant,
// user or mTLS identity that owns its keys. Records are found by (scope, key),
// so one scope never receives another's stored outcome. By default every call
// has the empty scope. An error from scope is returned to the caller as it is
// when it is a gRPC status, and as Internal otherwise; the handler does not run.
// Put authentication before the idempotency interceptor so that scope can read
// the identity it establishes.
func WithScope(scope func(ctx context.Context) (string, error)) Option {
	return func(o *options) { o.scope = scope }
}

// WithRetention sets how long a completed record is replayed; after that the
// key acts as never used, and the record is swept. It must be between
// MinRetention (10ms) and MaxRetention (ten years); zero keeps the default,
// 24 hours. A method whose proto sets (idempotency.v1.method).retention
// keeps its records for that long instead.
func WithRetention(d time.Duration) Option {
	return func(o *options) { o.setDuration("WithRetention", &o.retention, d, MinRetention, MaxRetention) }
}

// WithLease sets the lease under which a running handler holds its key. The
// interceptor renews it every third of its length while the handler runs;
// when the process dies, the lease runs out and a retry may run the handler
// again. The bbolt and memory stores never take a key from a handler that
// still runs in their process, however late its lease; shared stores do
// after the lease runs out (a replica paused that long is taken for dead),
// and the paused handler's context is then cancelled with ErrLeaseLost.
// It must be between MinLease (1s) and MaxLease (1h); zero keeps the
// default, 10 seconds.
func WithLease(d time.Duration) Option {
	return func(o *options) { o.setDuration("WithLease", &o.lease, d, MinLease, MaxLease) }
}

// WithWaitTimeout bounds how long a duplicate waits for the first call with
// its key to finish before it gets Aborted; the caller's deadline bounds it
// too. It must be between MinWaitTimeout (1ms) and MaxWaitTimeout (1h);
// zero keeps the default, 30 seconds.
func WithWaitTimeout(d time.Duration) Option {
	return func(o *options) {
		o.setDuration("WithWaitTimeout", &o.waitTimeout, d, MinWaitTimeout, MaxWaitTimeout)
	}
}

// WithRejectConcurrent makes a duplicate that arrives while the first call
// with its key is still running fail at once with Aborted, instead of waiting
// for the first call's outcome (the default).
func WithRejectConcurrent() Option {
	return func(o *options) { o.reject = true }
}

// WithCacheableCodes replaces the set of status codes whose outcomes are
// stored and replayed (DefaultCacheableCodes). Outcomes with other codes
// release the key, so a retry runs the handler again.
func WithCacheableCodes(cs ...codes.Code) Option {
	return func(o *options) {
		o.cacheable = [32]bool{}
		for _, c := range cs {
			if int(c) < len(o.cacheable) {
				o.cacheable[c] = true
			}
		}
	}
}

// WithMethods limits idempotency to the named methods, among those whose
// proto does not declare their policy (see the package documentation:
// (idempotency.v1.method) and idempotency_level come first); other methods
// run as if there were no interceptor. Names are full method names, as the
// generated _FullMethodName constants spell them:
// "/payments.v1.PaymentService/Charge". By default every method takes part,
// except those of gRPC's infrastructure services (health, reflection,
// channelz), which take part only if named here or in WithRequiredKey.
//
// NewServer returns an error for a name that is not a full method name, and
// for a method whose proto declares that it takes no part
// (PARTICIPATION_NONE, or NO_SIDE_EFFECTS or IDEMPOTENT without an
// (idempotency.v1.method) option): the proto would win, and the name would
// silently do nothing.
func WithMethods(fullMethods ...string) Option {
	return func(o *options) {
		if o.methods.methods == nil {
			o.methods.methods = make(map[string]bool)
		}
		for _, m := range fullMethods {
			if o.checkNamed("WithMethods", m, false) {
				o.methods.methods[m] = true
			}
		}
	}
}

// WithRequiredKey makes the named methods refuse calls without a key, with
// InvalidArgument naming the header (and the key field, if the method has
// one). With "*", every method that takes part by the Go options requires
// a key; a method whose proto declares its participation keeps it. Names
// are checked as WithMethods checks them; a method whose proto declares
// PARTICIPATION_KEY_OPTIONAL is refused too.
func WithRequiredKey(fullMethods ...string) Option {
	return func(o *options) {
		if o.methods.required == nil {
			o.methods.required = make(map[string]bool)
		}
		for _, m := range fullMethods {
			if m == "*" || o.checkNamed("WithRequiredKey", m, true) {
				o.methods.required[m] = true
			}
		}
	}
}

// checkNamed records an error if m, named in the option opt, is not a full
// method name or contradicts what the method's proto declares.
func (o *options) checkNamed(opt, m string, required bool) bool {
	if err := checkMethodName(m); err != nil {
		o.errs = append(o.errs, fmt.Errorf("idempotency: %s: %w", opt, err))
		return false
	}
	md, err := findMethod(protoregistry.GlobalFiles, m)
	if err != nil {
		return true // nothing declared: the Go options decide
	}
	part, safe, _, err := methodOptions(md)
	if err != nil {
		return true // checkDeclared reports it
	}
	var says string
	switch {
	case part == idempotencyv1.Participation_PARTICIPATION_NONE:
		says = "(idempotency.v1.method) PARTICIPATION_NONE"
	case part == idempotencyv1.Participation_PARTICIPATION_UNSPECIFIED && safe:
		says = "idempotency_level = " + md.Options().(*descriptorpb.MethodOptions).GetIdempotencyLevel().String() + ", which takes no part"
	case required && part == idempotencyv1.Participation_PARTICIPATION_KEY_OPTIONAL:
		says = "(idempotency.v1.method) PARTICIPATION_KEY_OPTIONAL"
	default:
		return true
	}
	o.errs = append(o.errs, fmt.Errorf("idempotency: %s(%q): its proto declares %s, and the proto's declaration comes first; change the proto's (idempotency.v1.method) option instead", opt, m, says))
	return false
}

// WithPolicy sets a function that decides, per full method name, whether the
// method is skipped, takes an optional key or requires one. It replaces
// WithMethods and WithRequiredKey, for the methods whose proto declares
// nothing: (idempotency.v1.method) and idempotency_level come first. It is
// not asked about gRPC's infrastructure services (health, reflection,
// channelz) unless WithMethods or WithRequiredKey names them, so that a
// blanket rule leaves health checks alone.
func WithPolicy(policy func(fullMethod string) Policy) Option {
	return func(o *options) { o.methods.fn = policy }
}

// WithKeyField names the request field that carries the idempotency key
// (AIP-155's request_id), for protos that cannot be marked with
// [(idempotency.v1.field).key = true]. It applies to the named methods, or,
// with none, to every method that takes part and whose request has a
// singular string field of that name at its top level and marks no key
// field of its own. As with a marked field: the key of a unary or
// server-streaming call whose metadata has none comes from the field, both
// present and different is InvalidArgument, and the field is left out of
// the fingerprint. Clients need WithClientKeyField with the same field.
//
// NewServer returns an error if a named method is not in the protobuf
// registry, its request has no such string field, or its proto marks
// another field as the key.
func WithKeyField(field string, fullMethods ...string) Option {
	return func(o *options) {
		r, errs := newKeyFieldRule("WithKeyField", field, fullMethods)
		o.errs = append(o.errs, errs...)
		if len(errs) == 0 {
			o.methods.keyFields = append(o.methods.keyFields, r)
		}
	}
}

// newKeyFieldRule checks a WithKeyField or WithClientKeyField.
func newKeyFieldRule(opt, field string, fullMethods []string) (keyFieldRule, []error) {
	r := keyFieldRule{field: protoreflect.Name(field)}
	if !r.field.IsValid() {
		return r, []error{fmt.Errorf("idempotency: %s(%q): not a field name", opt, field)}
	}
	var errs []error
	for _, m := range fullMethods {
		if err := checkMethodName(m); err != nil {
			errs = append(errs, fmt.Errorf("idempotency: %s: %w", opt, err))
			continue
		}
		md, err := findMethod(protoregistry.GlobalFiles, m)
		if err != nil {
			errs = append(errs, fmt.Errorf("idempotency: %s(%q, %q): %w", opt, field, m, err))
			continue
		}
		fd := md.Input().Fields().ByName(r.field)
		switch {
		case fd == nil:
			errs = append(errs, fmt.Errorf("idempotency: %s(%q, %q): %s has no field %s", opt, field, m, md.Input().FullName(), field))
			continue
		case keyFieldProblem(fd) != "":
			errs = append(errs, fmt.Errorf("idempotency: %s(%q, %q): %s", opt, field, m, keyFieldProblem(fd)))
			continue
		}
		if d := declare(md); d.keyField != nil && d.keyField != fd {
			errs = append(errs, fmt.Errorf("idempotency: %s(%q, %q): the proto marks %s as the key field, and its mark comes first", opt, field, m, d.keyField.FullName()))
			continue
		}
		if r.methods == nil {
			r.methods = make(map[string]bool)
		}
		r.methods[m] = true
	}
	return r, errs
}

// WithFingerprintExclude leaves fields of fullMethod's request out of its
// fingerprint, for protos that cannot be marked with
// [(idempotency.v1.field).fingerprint_exclude = true]. Paths name fields as
// a FieldMask does ("client_sent_at", "metadata.trace_id"): every element
// but the last is a singular message field. A retry that differs from the
// first call only in these fields is replayed instead of refused, so use it
// only for fields that cannot change the outcome (trace ids, client
// timestamps): the retry gets the first call's outcome, computed from the
// first call's values.
//
// NewServer returns an error if the method is not in the protobuf registry
// or a path does not resolve in its request.
func WithFingerprintExclude(fullMethod string, paths ...string) Option {
	return func(o *options) {
		if err := checkMethodName(fullMethod); err != nil {
			o.errs = append(o.errs, fmt.Errorf("idempotency: WithFingerprintExclude: %w", err))
			return
		}
		md, err := findMethod(protoregistry.GlobalFiles, fullMethod)
		if err != nil {
			o.errs = append(o.errs, fmt.Errorf("idempotency: WithFingerprintExclude(%q): %w", fullMethod, err))
			return
		}
		for _, p := range paths {
			if _, err := fieldPath(md.Input(), p); err != nil {
				o.errs = append(o.errs, fmt.Errorf("idempotency: WithFingerprintExclude(%q, %q): %w", fullMethod, p, err))
				return
			}
		}
		if o.methods.exclude == nil {
			o.methods.exclude = make(map[string][]string)
		}
		o.methods.exclude[fullMethod] = append(o.methods.exclude[fullMethod], paths...)
	}
}

// WithFailOpen makes the interceptors run the handler without idempotency
// when the store cannot be reached, logging and reporting EventFailOpen. By
// default they fail closed: Unavailable, and the handler does not run.
func WithFailOpen() Option {
	return func(o *options) { o.failOpen = true }
}

// WithMaxRecordSize bounds the size of a stored record in bytes: an outcome
// that would be larger is returned to the caller, and its key keeps a
// status-only record, so that a duplicate gets FailedPrecondition saying the
// outcome was too large to replay rather than running the handler again
// (EventRecordTooLarge; WithRerunOversized releases the key instead). For
// streams it also bounds the memory the interceptor holds while recording.
// Zero or less keeps the default, 4 MiB.
func WithMaxRecordSize(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.maxRecordSize = n
		}
	}
}

// WithMaxStreamMessages bounds how many sent messages a stream's record
// holds; a stream that sends more is too large to store, as with
// WithMaxRecordSize. Zero or less keeps the default, 1024.
func WithMaxStreamMessages(n int) Option {
	return func(o *options) {
		if n > 0 {
			o.maxStreamMsgs = n
		}
	}
}

// WithRerunOversized makes a duplicate of a call whose outcome was too large
// to store run the handler again, as if the key had never been used: its key
// is released instead of keeping a status-only record. Use it only for
// methods whose handlers are idempotent by themselves.
func WithRerunOversized() Option {
	return func(o *options) { o.rerunOversized = true }
}

// WithStoreTimeout bounds the store calls that do not follow the caller's
// deadline, because cutting them off midway could leave the key held or the
// outcome unsaved: a Reserve (a caller that gives up meanwhile has its key
// released at once), and saving or releasing the outcome after the handler
// ran, which is retried with backoff within this bound. It must be between
// MinStoreTimeout (10ms) and MaxStoreTimeout (10m); zero keeps the default,
// 10 seconds.
func WithStoreTimeout(d time.Duration) Option {
	return func(o *options) {
		o.setDuration("WithStoreTimeout", &o.storeTimeout, d, MinStoreTimeout, MaxStoreTimeout)
	}
}

// WithLogger sets the logger for what the interceptors cannot return to a
// caller: store failures, records not saved, fail-open calls. The default is
// slog.Default(). A nil logger discards.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l == nil {
			l = slog.New(slog.DiscardHandler)
		}
		o.logger = l
	}
}

// WithObserver adds a function called for every Event, synchronously, on the
// call's goroutine, with the call's context (its span, its values): keep it
// fast. Hang metrics and traces on it (package idemotel does). Observers
// added by several WithObserver options each get every event, in the order
// the options were given. A nil function is ignored.
func WithObserver(observe func(ctx context.Context, e Event)) Option {
	return func(o *options) {
		if observe != nil {
			o.observers = append(o.observers, observe)
		}
	}
}
