// Command client makes payments through the idempotency client
// interceptors and prints, for each, its key, how many attempts it took,
// whether the answer was a replay, and its charges.
//
//	go run ./examples/payments/client [-addr 127.0.0.1:50051] [-mode unary|installments|batch|interactive]
//	    [-account acct_demo] [-amount 1250] [-currency EUR] [-count 3]
//	    [-n 1] [-key KEY] [-tenant T] [-attempts 5] [-timeout 10s]
//
// With -key and -n 2 or more, every payment after the first is a replay of
// the first: same charge ids, "replayed true".
package main

import "github.com/grpcidem/idempotency/examples/payments/internal/app"

func main() { app.Main("client", app.RunClient) }
