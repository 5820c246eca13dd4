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
// By default: every method takes part and a key is optional (WithMethods,
// WithRequiredKey); the scope is empty (WithScope); records live 24 hours
// (WithRetention); duplicates wait up to 30 seconds (WithWaitTimeout); a store
// failure refuses the call with Unavailable (WithFailOpen runs it instead).
// Every duration option has a documented range, checked by NewServer.
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
// Retries are off by default (WithMaxAttempts turns them on); grpc-go's own
// retry policy and transparent retries run below the interceptor and reuse
// its key.
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
// test.
package idempotency
