// Package idemotel reports what an idempotency.Server does to OpenTelemetry:
// metrics of its calls' outcomes, the outcome of each call on the call's
// span, and a bbolt store's group commits. It is a module of its own, so
// that importing github.com/grpcidem/idempotency never pulls OpenTelemetry
// in.
//
//	tel := idemotel.New(idemotel.WithMeterProvider(mp), idemotel.WithTracerProvider(tp))
//	store, err := boltstore.Open(path, boltstore.WithCommitObserver(tel.BoltCommits))
//	...
//	idem, err := idempotency.NewServer(store, tel.ServerOption())
//
// or, without the bbolt commit metrics, in one line:
//
//	idem, err := idempotency.NewServer(store, idemotel.WithTelemetry())
//
// By default the global MeterProvider and TracerProvider are used (as
// otel.GetMeterProvider and otel.GetTracerProvider return them when New
// runs). Telemetry hangs on idempotency.WithObserver, and adds to the
// Server's other observers.
//
// # Metrics
//
// Instrument names follow OpenTelemetry's naming conventions; the
// Prometheus exporter turns idempotency.server.executions into
// idempotency_server_executions_total and idempotency.server.wait.duration
// into idempotency_server_wait_duration_seconds.
//
//	| name                                 | kind      | unit     | attributes                       | meaning                                                                |
//	|--------------------------------------|-----------|----------|----------------------------------|------------------------------------------------------------------------|
//	| idempotency.server.executions        | Counter   | {call}   | method, code, idempotency.stored | first executions: the handler ran; stored says whether its outcome was |
//	| idempotency.server.replays           | Counter   | {call}   | method, code, idempotency.waited | duplicates answered from the stored record; code is the replayed one   |
//	| idempotency.server.mismatches        | Counter   | {call}   | method, code                     | keys reused for another method or request (FailedPrecondition)         |
//	| idempotency.server.conflicts         | Counter   | {call}   | method, code, idempotency.waited | duplicates of a running call refused with Aborted                      |
//	| idempotency.server.store_errors      | Counter   | {error}  | method, code                     | store calls that failed; code is what the call got (OK if unchanged)   |
//	| idempotency.server.fail_opens        | Counter   | {call}   | method                           | calls run without idempotency because the store failed (WithFailOpen)  |
//	| idempotency.server.oversized_records | Counter   | {record} | method, code                     | outcomes too large to store (WithMaxRecordSize, WithMaxStreamMessages) |
//	| idempotency.server.wait.duration     | Histogram | s        | method, code                     | how long a duplicate waited for the running first execution of its key |
//	| idempotency.server.handler.duration  | Histogram | s        | method, code                     | how long the handler of a first execution ran                          |
//	| idempotency.server.record.size       | Histogram | By       | method                           | size of each record stored                                             |
//	| idempotency.bolt.commit.records      | Histogram | {record} | (none)                           | records per group commit of a bbolt store (BoltCommits)                |
//	| idempotency.bolt.commit.duration     | Histogram | s        | (none)                           | time of each group commit of a bbolt store, fsync included             |
//
// The attributes follow OpenTelemetry's current (stable) RPC semantic
// conventions: method is rpc.method, the fully-qualified method name
// (payments.v1.PaymentService/Charge); code is rpc.response.status_code,
// the status code as gRPC spells it (OK, ABORTED). idempotency.stored and
// idempotency.waited are booleans. Keys and scopes are never metric
// attributes.
//
// # Traces
//
// Telemetry makes no span of its own for a call: it annotates the call's
// active span (trace.SpanFromContext, as otelgrpc's stats handler starts it)
// with the call's outcome:
//
//	| attribute or event                 | when                                                            |
//	|------------------------------------|-----------------------------------------------------------------|
//	| idempotency.outcome                | executed, replayed, mismatch, conflict or fail_open             |
//	| idempotency.stored                 | executed: whether the outcome was stored                        |
//	| idempotency.record.size            | executed and stored: the record's size in bytes                 |
//	| idempotency.waited                 | replayed or conflict: whether the duplicate waited              |
//	| idempotency.wait.duration          | replayed or conflict after waiting: the wait, in seconds        |
//	| idempotency.key, idempotency.scope | only with WithKeys: keys and scopes can be business identifiers |
//	| event idempotency.store_error      | each store failure, with exception.message                      |
//	| event idempotency.fail_open        | the call ran without idempotency, with exception.message        |
//	| event idempotency.record_too_large | the outcome was too large to store, with its size               |
//
// A duplicate that waited also gets a child span, idempotency.wait, from
// the TracerProvider, covering its wait, so that a trace shows where the
// time went.
package idemotel
