// Package idempotency makes retried gRPC calls safe: a Server runs each
// handler once per idempotency key and answers every duplicate with the
// stored outcome, byte for byte; client interceptors give each logical call a
// key and keep it across retries.
//
// # Server
//
//	store, err := boltstore.Open("idempotency.db") // the embedded default
//	if err != nil { ... }
//	idem, err := idempotency.NewServer(store, idempotency.WithScope(tenant))
//	if err != nil { ... }
//	srv := grpc.NewServer(
//		grpc.ChainUnaryInterceptor(recovery, auth, idem.UnaryServerInterceptor()),
//		grpc.ChainStreamInterceptor(recovery, auth, idem.StreamServerInterceptor()),
//	)
//
// A call that carries the metadata "idempotency-key" (1 to 255 visible ASCII
// characters) runs once per (scope, key). Its outcome — response messages,
// status code, message and details, and the header and trailer metadata the
// handler set — is stored when its code is cacheable (DefaultCacheableCodes)
// and replayed to every duplicate with the header "idempotency-replayed:
// true". A duplicate that arrives while the first call runs waits for its
// outcome (or, with WithRejectConcurrent, gets Aborted at once). A key reused
// for another method or request gets FailedPrecondition. Other codes release
// the key, so a retry runs the handler again.
//
// By default: every method takes part and a key is optional, except gRPC's
// health, reflection and channelz services and the methods a proto declares
// out (see Policy below); the scope is empty (WithScope); records live 24
// hours (WithRetention); duplicates wait up to 30 seconds (WithWaitTimeout);
// a store failure refuses the call with Unavailable (WithFailOpen runs it
// instead). Every duration option has a documented range, and every method
// name a documented form, checked by NewServer.
//
// # Policy
//
// Which methods take part, whether they require a key, where the key is and
// what the fingerprint leaves out can be declared in the service's .proto
// file, with the options of idempotency/v1/options.proto (package
// github.com/grpcidem/idempotency/proto/idempotency/v1):
//
//	import "idempotency/v1/options.proto";
//
//	rpc Charge(ChargeRequest) returns (ChargeResponse) {
//	  option (idempotency.v1.method) = {participation: PARTICIPATION_KEY_REQUIRED};
//	}
//	rpc GetCharge(GetChargeRequest) returns (ChargeResponse) {
//	  option idempotency_level = NO_SIDE_EFFECTS;
//	}
//	message ChargeRequest {
//	  string request_id = 1 [(idempotency.v1.field).key = true];
//	  string client_note = 5 [(idempotency.v1.field).fingerprint_exclude = true];
//	}
//
// The server reads each method's policy from its descriptors, on its first
// call, and keeps it. Whether a method takes part is decided by the first of
// these that says anything; what a source says is never overridden by a
// later one:
//
//  1. the method's (idempotency.v1.method) participation: a required key,
//     an optional key, or none;
//  2. its idempotency_level: NO_SIDE_EFFECTS and IDEMPOTENT take no part
//     (such a method needs no record);
//  3. gRPC's infrastructure services (grpc.health.*, grpc.reflection.*,
//     grpc.channelz.*) take no part unless WithMethods or WithRequiredKey
//     names the method;
//  4. the Go options: WithPolicy if set, else WithMethods and
//     WithRequiredKey; by default, an optional key.
//
// NewServer refuses a Go option that names a method against its proto (such
// as WithMethods of a NO_SIDE_EFFECTS method), since it would do nothing.
// A method's (idempotency.v1.method) retention replaces WithRetention.
//
// A request field marked as the key, or named by WithKeyField for protos
// that cannot be changed (AIP-155's request_id), supplies the key of a unary
// or server-streaming call whose metadata has none; metadata and field
// holding different keys is InvalidArgument. Client- and
// bidirectional-streaming calls take their key from the metadata only.
//
// The fingerprint leaves out the key field and the fields marked
// fingerprint_exclude (or named by WithFingerprintExclude), so a retry that
// differs only in them is replayed, and gets the first call's outcome. Leave
// out only fields that cannot change the outcome: trace ids, client
// timestamps, notes.
//
// # Client
//
//	conn, err := grpc.NewClient(target,
//		grpc.WithChainUnaryInterceptor(idempotency.UnaryClientInterceptor(idempotency.WithMaxAttempts(5))),
//		grpc.WithChainStreamInterceptor(idempotency.StreamClientInterceptor()),
//	)
//	var replayed bool
//	resp, err := client.Charge(ctx, req, idempotency.WithKey(orderID), idempotency.Replayed(&replayed))
//
// The client interceptors give keys only to calls of methods that take part,
// read from the same descriptors as the server: not to health checks,
// reflection, or methods declared NO_SIDE_EFFECTS, IDEMPOTENT or
// PARTICIPATION_NONE. A request's empty key field is filled with a random
// UUID4 (AIP-4235) before the first attempt, in the caller's message; a key
// field the caller filled is kept. A key the caller gives (WithKey, or the
// metadata) is sent as it is.
//
// Retries are off by default (WithMaxAttempts turns them on); grpc-go's own
// retry policy and transparent retries run below the interceptor and reuse
// its key. A call without a key is not retried, unless its method is
// declared NO_SIDE_EFFECTS or IDEMPOTENT.
//
// # Stores
//
// Each store is its own package: boltstore (durable, one file, one process:
// the default), memstore (in memory), and, in modules of their own so that
// their clients are compiled only by those who use them,
// github.com/grpcidem/idempotency/redisstore and
// github.com/grpcidem/idempotency/pgstore for several replicas.
//
// # Writing a store
//
// A Store keeps Records under store keys (StoreKey of a scope and a key) and
// the leases of running first executions; its interface documents each
// method's contract. Refuse what CheckStoreKey and CheckDuration refuse, and
// run the conformance suite in package storetest against it: one line in a
// test. A store that can tell cheaply whether it can serve implements
// HealthChecker.
//
// # Operating
//
// Every observer set by WithObserver gets every Event with the call's
// context; github.com/grpcidem/idempotency/idemotel, a module of its own,
// turns them into OpenTelemetry metrics and span attributes. Server.Health
// and Server.WatchHealth say whether the store can serve, for the standard
// gRPC health service: NOT_SERVING while the Server would refuse first
// executions with Unavailable (never with WithFailOpen).
package idempotency
