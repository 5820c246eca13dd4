// Command demo shows, in a few seconds, that payments stay exactly-once over
// an unreliable link: it starts a payments server on a temporary bbolt file,
// pays through a link that loses answers after the server ran the call, with
// a service that fails some executions with Unavailable and clients that
// send some payments twice at once, and prints what happened. It exits with
// status 1 if any payment was executed a number of times other than once.
//
//	go run ./examples/payments/demo [-v]
package main

import "github.com/grpcidem/idempotency/examples/payments/internal/app"

func main() { app.Main("demo", app.RunDemo) }
