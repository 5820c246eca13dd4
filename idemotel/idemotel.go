package idemotel

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"

	"github.com/grpcidem/idempotency"
)

// ScopeName is the instrumentation scope of the meter and tracer.
const ScopeName = "github.com/grpcidem/idempotency/idemotel"

// An Option configures Telemetry.
type Option func(*config)

type config struct {
	mp   metric.MeterProvider
	tp   trace.TracerProvider
	keys bool
}

// WithMeterProvider sets the MeterProvider the instruments are made with.
// The default is the global one (otel.GetMeterProvider), read when New runs.
func WithMeterProvider(mp metric.MeterProvider) Option {
	return func(c *config) {
		if mp != nil {
			c.mp = mp
		}
	}
}

// WithTracerProvider sets the TracerProvider of the wait spans (see the
// package documentation). The default is the global one
// (otel.GetTracerProvider), read when New runs.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(c *config) {
		if tp != nil {
			c.tp = tp
		}
	}
}

// WithKeys puts each call's idempotency key and scope on its span
// (idempotency.key, idempotency.scope). They are left out by default: keys
// and scopes can be business identifiers (an order number, a tenant). They
// never go on metrics, whose attributes must stay few.
func WithKeys() Option {
	return func(c *config) { c.keys = true }
}

// Telemetry turns a Server's events into OpenTelemetry metrics and span
// attributes, and a bbolt store's group commits into metrics. One Telemetry
// may serve several Servers and stores; it is safe for concurrent use.
type Telemetry struct {
	keys   bool
	tracer trace.Tracer

	executions, replays, mismatches, conflicts metric.Int64Counter
	storeErrors, failOpens, oversized          metric.Int64Counter
	waitTime, handlerTime                      metric.Float64Histogram
	recordSize                                 metric.Int64Histogram
	commitRecords                              metric.Int64Histogram
	commitTime                                 metric.Float64Histogram

	mu    sync.RWMutex
	attrs map[attrKey]metric.MeasurementOption
}

// Bucket boundaries: durations as OpenTelemetry's semantic conventions
// advise for request durations, sizes in powers of 4 from 64 bytes to the
// 4 MiB default record limit, commits in powers of 2.
var (
	durationBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30}
	sizeBuckets     = []float64{64, 256, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20}
	commitBuckets   = []float64{1, 2, 4, 8, 16, 32, 64, 128, 256}
)

// New returns a Telemetry whose instruments are made with the options'
// providers. An instrument that cannot be made is reported to the global
// error handler (otel.Handle) and left out, as OpenTelemetry's own
// instrumentations do: telemetry never stops a server.
func New(opts ...Option) *Telemetry {
	c := config{mp: otel.GetMeterProvider(), tp: otel.GetTracerProvider()}
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	m := c.mp.Meter(ScopeName)
	t := &Telemetry{keys: c.keys, tracer: c.tp.Tracer(ScopeName), attrs: make(map[attrKey]metric.MeasurementOption)}
	counter := func(name, unit, desc string) metric.Int64Counter {
		i, err := m.Int64Counter(name, metric.WithUnit(unit), metric.WithDescription(desc))
		if err != nil {
			otel.Handle(err)
		}
		return i
	}
	t.executions = counter("idempotency.server.executions", "{call}", "First executions of keyed calls: the handler ran.")
	t.replays = counter("idempotency.server.replays", "{call}", "Duplicates answered from a stored record, without running the handler.")
	t.mismatches = counter("idempotency.server.mismatches", "{call}", "Keys reused for another method or request, refused with FailedPrecondition.")
	t.conflicts = counter("idempotency.server.conflicts", "{call}", "Duplicates of a running call refused with Aborted (reject mode, or the wait ran out).")
	t.storeErrors = counter("idempotency.server.store_errors", "{error}", "Store calls that failed.")
	t.failOpens = counter("idempotency.server.fail_opens", "{call}", "Calls run without idempotency because the store failed (WithFailOpen).")
	t.oversized = counter("idempotency.server.oversized_records", "{record}", "Outcomes too large to store (WithMaxRecordSize, WithMaxStreamMessages).")
	var err error
	if t.waitTime, err = m.Float64Histogram("idempotency.server.wait.duration", metric.WithUnit("s"),
		metric.WithDescription("How long duplicates waited for the running first execution of their key."),
		metric.WithExplicitBucketBoundaries(durationBuckets...)); err != nil {
		otel.Handle(err)
	}
	if t.handlerTime, err = m.Float64Histogram("idempotency.server.handler.duration", metric.WithUnit("s"),
		metric.WithDescription("How long the handler of a first execution ran."),
		metric.WithExplicitBucketBoundaries(durationBuckets...)); err != nil {
		otel.Handle(err)
	}
	if t.recordSize, err = m.Int64Histogram("idempotency.server.record.size", metric.WithUnit("By"),
		metric.WithDescription("Size of the records stored for first executions."),
		metric.WithExplicitBucketBoundaries(sizeBuckets...)); err != nil {
		otel.Handle(err)
	}
	if t.commitRecords, err = m.Int64Histogram("idempotency.bolt.commit.records", metric.WithUnit("{record}"),
		metric.WithDescription("Records written by each group commit of a bbolt store."),
		metric.WithExplicitBucketBoundaries(commitBuckets...)); err != nil {
		otel.Handle(err)
	}
	if t.commitTime, err = m.Float64Histogram("idempotency.bolt.commit.duration", metric.WithUnit("s"),
		metric.WithDescription("How long each group commit of a bbolt store took, fsync included."),
		metric.WithExplicitBucketBoundaries(durationBuckets...)); err != nil {
		otel.Handle(err)
	}
	return t
}

// WithTelemetry returns the idempotency.Option that reports a Server's
// events to a new Telemetry:
//
//	idempotency.NewServer(store, idemotel.WithTelemetry(idemotel.WithMeterProvider(mp)))
//
// Use New and Telemetry.ServerOption instead to share one Telemetry with a
// bbolt store's commit observer.
func WithTelemetry(opts ...Option) idempotency.Option {
	return New(opts...).ServerOption()
}

// ServerOption returns the idempotency.Option that reports a Server's events
// to t (idempotency.WithObserver(t.Observe)). It adds to the Server's other
// observers.
func (t *Telemetry) ServerOption() idempotency.Option {
	return idempotency.WithObserver(t.Observe)
}

// BoltCommits is the observer of a bbolt store's group commits:
//
//	boltstore.Open(path, boltstore.WithCommitObserver(tel.BoltCommits))
func (t *Telemetry) BoltCommits(records int, took time.Duration) {
	ctx := context.Background()
	if t.commitRecords != nil {
		t.commitRecords.Record(ctx, int64(records))
	}
	if t.commitTime != nil {
		t.commitTime.Record(ctx, took.Seconds())
	}
}

// Span attribute keys.
const (
	OutcomeKey      = attribute.Key("idempotency.outcome")
	StoredKey       = attribute.Key("idempotency.stored")
	WaitedKey       = attribute.Key("idempotency.waited")
	WaitDurationKey = attribute.Key("idempotency.wait.duration")
	RecordSizeKey   = attribute.Key("idempotency.record.size")
	KeyKey          = attribute.Key("idempotency.key")
	ScopeKey        = attribute.Key("idempotency.scope")
)

// Observe records e, which happened to the call of ctx. It is the observer
// ServerOption sets.
func (t *Telemetry) Observe(ctx context.Context, e idempotency.Event) {
	switch e.Kind {
	case idempotency.EventExecuted:
		add(ctx, t.executions, t.attrsOf(e.Method, e.Code, flagStored, e.Stored))
		if t.handlerTime != nil {
			t.handlerTime.Record(ctx, e.Duration.Seconds(), t.attrsOf(e.Method, e.Code, 0, false))
		}
		if e.Stored && t.recordSize != nil {
			t.recordSize.Record(ctx, int64(e.Size), t.attrsOf(e.Method, noCode, 0, false))
		}
	case idempotency.EventReplayed:
		add(ctx, t.replays, t.attrsOf(e.Method, e.Code, flagWaited, e.Waited))
		t.waited(ctx, e)
	case idempotency.EventMismatch:
		add(ctx, t.mismatches, t.attrsOf(e.Method, e.Code, 0, false))
	case idempotency.EventConflict:
		add(ctx, t.conflicts, t.attrsOf(e.Method, e.Code, flagWaited, e.Waited))
		t.waited(ctx, e)
	case idempotency.EventStoreError:
		add(ctx, t.storeErrors, t.attrsOf(e.Method, e.Code, 0, false))
	case idempotency.EventFailOpen:
		add(ctx, t.failOpens, t.attrsOf(e.Method, noCode, 0, false))
	case idempotency.EventRecordTooLarge:
		add(ctx, t.oversized, t.attrsOf(e.Method, e.Code, 0, false))
	}
	t.span(ctx, e)
}

func add(ctx context.Context, c metric.Int64Counter, attrs metric.MeasurementOption) {
	if c != nil {
		c.Add(ctx, 1, attrs)
	}
}

// waited records the wait of a duplicate that waited, and gives it a span
// of its own under the call's.
func (t *Telemetry) waited(ctx context.Context, e idempotency.Event) {
	if !e.Waited {
		return
	}
	if t.waitTime != nil {
		t.waitTime.Record(ctx, e.Duration.Seconds(), t.attrsOf(e.Method, e.Code, 0, false))
	}
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return // a wait span with no call span around it would be noise
	}
	end := time.Now()
	_, span := t.tracer.Start(ctx, "idempotency.wait", trace.WithTimestamp(end.Add(-e.Duration)), trace.WithSpanKind(trace.SpanKindInternal))
	span.SetAttributes(OutcomeKey.String(outcomes[e.Kind]))
	span.End(trace.WithTimestamp(end))
}

var outcomes = map[idempotency.EventKind]string{
	idempotency.EventExecuted:   "executed",
	idempotency.EventReplayed:   "replayed",
	idempotency.EventMismatch:   "mismatch",
	idempotency.EventConflict:   "conflict",
	idempotency.EventFailOpen:   "fail_open",
	idempotency.EventStoreError: "store_error",
}

// span puts the call's outcome on its span: attributes for the outcome, and
// events for what can happen more than once in a call (store errors).
func (t *Telemetry) span(ctx context.Context, e idempotency.Event) {
	span := trace.SpanFromContext(ctx)
	if !span.IsRecording() {
		return
	}
	if t.keys {
		span.SetAttributes(KeyKey.String(e.Key), ScopeKey.String(e.Scope))
	}
	switch e.Kind {
	case idempotency.EventExecuted:
		span.SetAttributes(OutcomeKey.String("executed"), StoredKey.Bool(e.Stored))
		if e.Stored {
			span.SetAttributes(RecordSizeKey.Int(e.Size))
		}
	case idempotency.EventReplayed, idempotency.EventConflict:
		span.SetAttributes(OutcomeKey.String(outcomes[e.Kind]), WaitedKey.Bool(e.Waited))
		if e.Waited {
			span.SetAttributes(WaitDurationKey.Float64(e.Duration.Seconds()))
		}
	case idempotency.EventMismatch:
		span.SetAttributes(OutcomeKey.String("mismatch"))
	case idempotency.EventFailOpen:
		span.SetAttributes(OutcomeKey.String("fail_open"))
		span.AddEvent("idempotency.fail_open", trace.WithAttributes(errorMessage(e.Err)))
	case idempotency.EventStoreError:
		span.AddEvent("idempotency.store_error", trace.WithAttributes(errorMessage(e.Err)))
	case idempotency.EventRecordTooLarge:
		span.AddEvent("idempotency.record_too_large", trace.WithAttributes(RecordSizeKey.Int(e.Size), errorMessage(e.Err)))
	}
}

func errorMessage(err error) attribute.KeyValue {
	if err == nil {
		return semconv.ExceptionMessage("")
	}
	return semconv.ExceptionMessage(err.Error())
}

// Metric attribute sets are cached: a call's measurements allocate nothing
// once its method and code have been seen.
type attrKey struct {
	method string
	code   codes.Code
	flag   uint8 // which boolean attribute, if any
	value  bool
}

const (
	flagStored = 1 + iota
	flagWaited
)

// noCode leaves the status code out of the attributes.
const noCode = codes.Code(1 << 31)

func (t *Telemetry) attrsOf(method string, code codes.Code, flag uint8, value bool) metric.MeasurementOption {
	k := attrKey{method, code, flag, value}
	t.mu.RLock()
	o, ok := t.attrs[k]
	t.mu.RUnlock()
	if ok {
		return o
	}
	kvs := []attribute.KeyValue{semconv.RPCMethod(strings.TrimPrefix(method, "/"))}
	if code != noCode {
		kvs = append(kvs, semconv.RPCResponseStatusCodeKey.String(codeName(code)))
	}
	switch flag {
	case flagStored:
		kvs = append(kvs, StoredKey.Bool(value))
	case flagWaited:
		kvs = append(kvs, WaitedKey.Bool(value))
	}
	o = metric.WithAttributeSet(attribute.NewSet(kvs...))
	t.mu.Lock()
	t.attrs[k] = o
	t.mu.Unlock()
	return o
}

// codeName is the status code as gRPC's protocol spells it (OK,
// DEADLINE_EXCEEDED), which is what rpc.response.status_code holds.
func codeName(c codes.Code) string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return strconv.Itoa(int(c))
}

var codeNames = [...]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}
