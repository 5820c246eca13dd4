// Command server serves the example PaymentService behind the idempotency
// interceptors, with the standard health service (NOT_SERVING while the
// idempotency store cannot serve), server reflection for grpcurl and ghz,
// and, with -metrics, the idempotency metrics as Prometheus text at
// http://ADDR/metrics. Which methods require a key is declared in
// payments.proto.
//
//	go run ./examples/payments/server [-addr 127.0.0.1:50051] [-store bolt|memory|redis|postgres]
//	    [-db payments-idem.db] [-redis 127.0.0.1:6379] [-postgres DSN]
//	    [-delay 0s] [-fail-every 0] [-grace 10s] [-metrics ADDR] [-v]
//
// It stops cleanly on SIGINT or SIGTERM: running calls get -grace to finish,
// then the store is closed. The interceptor chain is in
// ../internal/app/server.go (NewServer).
package main

import "github.com/grpcidem/idempotency/examples/payments/internal/app"

func main() { app.Main("server", app.RunServer) }
