// Package idempotency makes retried gRPC calls safe: server interceptors run
// a handler once per idempotency key and answer every duplicate with the
// stored outcome, byte for byte; client interceptors give each logical call a
// key and keep it across retries.
//
// # Server
//
//	store, err := idempotency.OpenBolt("idempotency.db")
//	...
//	srv := grpc.NewServer(
//		grpc.ChainUnaryInterceptor(auth, idempotency.UnaryServerInterceptor(store)),
//		grpc.ChainStreamInterceptor(auth, idempotency.StreamServerInterceptor(store)),
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
// BoltStore (the default, OpenBolt) keeps records durably in one file for one
// process; MemoryStore keeps them in memory. For several replicas use the
// modules github.com/grpcidem/idempotency/redisstore and
// github.com/grpcidem/idempotency/pgstore. Any Store can be checked with the
// conformance suite in package storetest.
package idempotency
