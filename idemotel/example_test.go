package idemotel_test

import (
	"context"
	"log"
	"path/filepath"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/idemotel"
)

// A server with the idempotency metrics (on the global MeterProvider, which
// the application sets up with its exporter), the bbolt store's commit
// metrics, and a health service that follows the store.
func Example() {
	ctx := context.Background()
	tel := idemotel.New()
	store, err := boltstore.Open(filepath.Join("/var/lib/payments", "idem.db"), boltstore.WithCommitObserver(tel.BoltCommits))
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	idem, err := idempotency.NewServer(store, tel.ServerOption())
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer(idem.ServerOptions()...)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	go idem.WatchHealth(ctx, 0, func(serving bool, err error) {
		st := healthpb.HealthCheckResponse_SERVING
		if !serving {
			st = healthpb.HealthCheckResponse_NOT_SERVING
			log.Printf("idempotency store: %v", err)
		}
		hs.SetServingStatus("", st)
	})
	// Register the services, then srv.Serve(lis).
}
