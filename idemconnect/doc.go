// Package idemconnect gives connect-go (connectrpc.com/connect) handlers and
// clients the guarantees of package idempotency: a handler runs once per
// idempotency key, and every duplicate gets the stored outcome, over the
// Connect, gRPC and gRPC-Web protocols alike.
//
// It is an adapter, not a second implementation: NewInterceptor hands each
// call to the engine of an *idempotency.Server (the same value whose gRPC
// interceptors serve a grpc-go server), so the key rules, scope, per-method
// policy (including the proto options and idempotency_level), store, record
// format, observer and errors are the same. A grpc-go replica and a connect
// replica on one shared store replay each other's records.
//
// Over HTTP the key is the Idempotency-Key header (HTTP header names are
// case-insensitive: it is the idempotency-key metadata of gRPC), and a
// replay carries Idempotency-Replayed: true. Errors are connect errors with
// the contract's codes; over the Connect protocol they become HTTP statuses
// by connect's table:
//
//	contract case                          code                 HTTP (Connect)   IETF draft
//	key missing (required) or malformed    invalid_argument     400              400
//	key reused for another request         failed_precondition  400              422
//	duplicate still running (wait ended)   aborted              409              409
//	store unavailable (fail-closed)        unavailable          503              -
//
// The IETF draft (draft-ietf-httpapi-idempotency-key-header) answers a
// reused key with 422 Unprocessable Content, and a concurrent duplicate with
// 409 Conflict; Connect has no code for 422, so a reused key is
// failed_precondition (400) with a message that says so. By default a
// duplicate waits for the first call and gets its outcome instead of 409.
//
// A connect handler sets headers and trailers on its response, or through
// connect.CallInfoForHandlerContext; both are recorded, along with an
// error's metadata (replayed as trailers). Scope functions (WithScope) see
// the request's headers as incoming gRPC metadata
// (metadata.FromIncomingContext), as they would on grpc-go; peer and TLS
// information is connect's (connect.CallInfoForHandlerContext), not grpc-go's.
package idemconnect
