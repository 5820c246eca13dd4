package app

import (
	"context"
	"log/slog"
	"time"

	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/grpcidem/idempotency"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"
)

// healthInterval is how often the health service checks the store. A store
// error that a call sees turns it NOT_SERVING at once.
const healthInterval = time.Second

// healthService returns the standard gRPC health service, whose status (of
// the server, "", and of the payments service) follows idem.Health:
// NOT_SERVING while the store cannot serve, so that the payments would be
// refused with Unavailable (the server fails closed), SERVING after, so that
// a load balancer sends calls elsewhere meanwhile. It follows the store
// until ctx ends (nil: until the process exits).
func healthService(ctx context.Context, idem *idempotency.Server, logger *slog.Logger) *health.Server {
	if ctx == nil {
		ctx = context.Background()
	}
	hs := health.NewServer()
	// The first status is known before the server serves, so that a
	// health check never finds the payments service unknown.
	first := healthpb.HealthCheckResponse_SERVING
	if err := idem.Health(ctx); err != nil {
		first = healthpb.HealthCheckResponse_NOT_SERVING
	}
	hs.SetServingStatus("", first)
	hs.SetServingStatus(paymentsv1.PaymentService_ServiceDesc.ServiceName, first)
	var reported bool
	go idem.WatchHealth(ctx, healthInterval, func(serving bool, err error) {
		st := healthpb.HealthCheckResponse_SERVING
		if !serving {
			st = healthpb.HealthCheckResponse_NOT_SERVING
			logger.Warn("the idempotency store cannot serve; health NOT_SERVING", "err", err)
		} else if reported {
			logger.Info("the idempotency store serves again; health SERVING")
		}
		reported = true
		hs.SetServingStatus("", st)
		hs.SetServingStatus(paymentsv1.PaymentService_ServiceDesc.ServiceName, st)
	})
	return hs
}
