package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/examples/internal/stores"
	"github.com/grpcidem/idempotency/examples/payments/service"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"
)

// PaymentMethods are the full names of the RPCs that charge. payments.proto
// declares that they require an idempotency key; the server needs no Go
// option to say so.
var PaymentMethods = []string{
	paymentsv1.PaymentService_Charge_FullMethodName,
	paymentsv1.PaymentService_ChargeInstallments_FullMethodName,
	paymentsv1.PaymentService_ChargeBatch_FullMethodName,
	paymentsv1.PaymentService_ChargeInteractive_FullMethodName,
}

// ServerConfig is what NewServer needs besides the store and the service.
type ServerConfig struct {
	Logger *slog.Logger
	// Observe, if set, is called for every idempotency event.
	Observe func(context.Context, idempotency.Event)
	// Options are added after the ones NewServer sets, and so win.
	Options []idempotency.Option
	// WithoutIdempotency leaves the idempotency interceptors out, for the
	// test that shows the demo's checks catch payments run twice. (No Go
	// option can turn a method off that payments.proto declares: the
	// proto comes first.)
	WithoutIdempotency bool
	// Context ends the server's background work (the health service's
	// watch of the store); nil: it runs until the process exits.
	Context context.Context
}

// NewServer returns a gRPC server with the payments service, the standard
// health service, server reflection (for grpcurl and ghz) and this
// interceptor chain, outermost first:
//
//  1. recovery: a panic anywhere below becomes Internal instead of a crash;
//  2. logging: sees every call's final outcome, replays included;
//  3. authentication (here a stand-in that trusts the x-tenant header):
//     before idempotency, so that the scope can use the identity;
//  4. idempotency, with the tenant as the scope: one tenant's keys can never
//     replay another tenant's outcomes;
//  5. the handler.
func NewServer(store idempotency.Store, svc paymentsv1.PaymentServiceServer, cfg ServerConfig) (*grpc.Server, error) {
	srv, _, err := NewServers(store, svc, cfg)
	return srv, err
}

// NewServers returns the gRPC server NewServer returns and, over the same
// idempotency Server (one engine, one store), the payments service as a
// connect handler (NewConnectHandler) for the Connect, gRPC and gRPC-Web
// protocols over HTTP.
func NewServers(store idempotency.Store, svc paymentsv1.PaymentServiceServer, cfg ServerConfig) (*grpc.Server, http.Handler, error) {
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	// Which methods take part, and that they require a key, is declared
	// in payments.proto: GetCharge, health checks and reflection take no
	// part, so they need no key and leave no record.
	opts := []idempotency.Option{
		idempotency.WithScope(scopeFromTenant),
		idempotency.WithLogger(logger),
	}
	if cfg.Observe != nil {
		opts = append(opts, idempotency.WithObserver(cfg.Observe))
	}
	opts = append(opts, cfg.Options...)
	idem, err := idempotency.NewServer(store, opts...)
	if err != nil {
		return nil, nil, err
	}
	unary := []grpc.UnaryServerInterceptor{recoverUnary(logger), logUnary(logger), tenantUnary}
	stream := []grpc.StreamServerInterceptor{recoverStream(logger), logStream(logger), tenantStream}
	if !cfg.WithoutIdempotency {
		unary = append(unary, idem.UnaryServerInterceptor())
		stream = append(stream, idem.StreamServerInterceptor())
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(unary...), grpc.ChainStreamInterceptor(stream...))
	paymentsv1.RegisterPaymentServiceServer(srv, svc)
	healthpb.RegisterHealthServer(srv, healthService(cfg.Context, idem, logger)) // NOT_SERVING while the store cannot serve
	reflection.Register(srv)
	return srv, NewConnectHandler(idem, svc, logger), nil
}

func recoverUnary(logger *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if p := recover(); p != nil {
				logger.Error("panic in handler", "method", info.FullMethod, "panic", p, "stack", string(debug.Stack()))
				err = status.Error(codes.Internal, "internal error")
			}
		}()
		return handler(ctx, req)
	}
}

func recoverStream(logger *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
		defer func() {
			if p := recover(); p != nil {
				logger.Error("panic in handler", "method", info.FullMethod, "panic", p, "stack", string(debug.Stack()))
				err = status.Error(codes.Internal, "internal error")
			}
		}()
		return handler(srv, ss)
	}
}

func logUnary(logger *slog.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := handler(ctx, req)
		logCall(ctx, logger, info.FullMethod, err, start)
		return resp, err
	}
}

func logStream(logger *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		start := time.Now()
		err := handler(srv, ss)
		logCall(ss.Context(), logger, info.FullMethod, err, start)
		return err
	}
}

func logCall(ctx context.Context, logger *slog.Logger, method string, err error, start time.Time) {
	key := metadata.ValueFromIncomingContext(ctx, idempotency.KeyHeader)
	logger.Debug("call", "method", method, "key", key, "code", status.Code(err), "took", time.Since(start).Round(time.Microsecond))
}

// TenantHeader is the metadata the authentication stand-in trusts. A real
// server verifies a token or a client certificate at this place in the chain.
const TenantHeader = "x-tenant"

type tenantKey struct{}

func withTenant(ctx context.Context) (context.Context, error) {
	tenant := "public"
	switch v := metadata.ValueFromIncomingContext(ctx, TenantHeader); len(v) {
	case 0:
	case 1:
		if v[0] == "" || len(v[0]) > 64 {
			return nil, status.Errorf(codes.Unauthenticated, "%s must be 1 to 64 characters", TenantHeader)
		}
		tenant = v[0]
	default:
		return nil, status.Errorf(codes.Unauthenticated, "%s has %d values; send one", TenantHeader, len(v))
	}
	return context.WithValue(ctx, tenantKey{}, tenant), nil
}

func scopeFromTenant(ctx context.Context) (string, error) {
	tenant, ok := ctx.Value(tenantKey{}).(string)
	if !ok {
		// Only a chain that puts idempotency before authentication gets here.
		return "", status.Error(codes.Internal, "no tenant in the call's context: the authentication interceptor must come before the idempotency interceptor")
	}
	return tenant, nil
}

func tenantUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	ctx, err := withTenant(ctx)
	if err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func tenantStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, err := withTenant(ss.Context())
	if err != nil {
		return err
	}
	return handler(srv, &contextStream{ServerStream: ss, ctx: ctx})
}

type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *contextStream) Context() context.Context { return s.ctx }

// eventCounts counts idempotency events by kind.
type eventCounts struct {
	replayed, mismatch, conflict, storeError, tooLarge, failOpen atomic.Int64
}

func (c *eventCounts) observe(_ context.Context, e idempotency.Event) {
	switch e.Kind {
	case idempotency.EventReplayed:
		c.replayed.Add(1)
	case idempotency.EventMismatch:
		c.mismatch.Add(1)
	case idempotency.EventConflict:
		c.conflict.Add(1)
	case idempotency.EventStoreError:
		c.storeError.Add(1)
	case idempotency.EventRecordTooLarge:
		c.tooLarge.Add(1)
	case idempotency.EventFailOpen:
		c.failOpen.Add(1)
	}
}

// RunServer is the payments server command; see ../../server.
func RunServer(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:50051", "address to listen on")
	httpAddr := fs.String("http", "127.0.0.1:8080", "address to serve Connect, gRPC-Web and gRPC over HTTP on (h2c; curl works); empty: off")
	storeCfg := stores.RegisterFlags(fs, "payments-idem.db")
	delay := fs.Duration("delay", 0, "how long each execution waits before it charges, so that duplicates overlap with it")
	failEvery := fs.Int("fail-every", 0, "fail every Nth execution with Unavailable before charging (0: never)")
	grace := fs.Duration("grace", 10*time.Second, "how long a shutdown waits for running calls before it cuts them off")
	verbose := fs.Bool("v", false, "log every call and idempotency event")
	metricsAddr := fs.String("metrics", "", "serve the idempotency metrics as Prometheus text at http://ADDR/metrics (default: off)")
	admin := adminFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *failEvery < 0 {
		return fmt.Errorf("-fail-every is %d; it must be 0 (never) or more", *failEvery)
	}
	if *delay < 0 {
		return fmt.Errorf("-delay is %v; it must not be negative", *delay)
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	metrics, err := startMetrics(*metricsAddr, storeCfg, stdout)
	if err != nil {
		return err
	}
	defer metrics.close()
	store, err := stores.Open(ctx, *storeCfg)
	if err != nil {
		return fmt.Errorf("open the %s store: %w", storeCfg.Kind, err)
	}
	defer func() {
		if err := store.Close(); err != nil {
			logger.Error("closing the store", "err", err)
		}
	}()
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}

	svc := service.New(service.WithDelay(*delay), service.WithFailEvery(*failEvery))
	var events eventCounts
	srv, connectHandler, err := NewServers(store, svc, ServerConfig{
		Logger: logger,
		Observe: func(ctx context.Context, e idempotency.Event) {
			events.observe(ctx, e)
			logger.Debug("idempotency", "event", e.Kind, "method", e.Method, "scope", e.Scope, "key", e.Key, "code", e.Code, "err", e.Err)
		},
		Options: metrics.options(),
		Context: ctx,
	})
	if err != nil {
		return err
	}
	stopAdmin, err := startAdmin(admin, store.Store, stdout, logger)
	if err != nil {
		return err
	}
	defer stopAdmin()
	fmt.Fprintf(stdout, "payments server listening on %s (store: %s)\n", lis.Addr(), store.Description)
	var hs *http.Server
	httpSet := false
	fs.Visit(func(f *flag.Flag) { httpSet = httpSet || f.Name == "http" })
	var hlis net.Listener
	if *httpAddr != "" {
		hlis, err = net.Listen("tcp", *httpAddr)
		switch {
		case err == nil:
		case httpSet:
			return fmt.Errorf("-http %s: %w", *httpAddr, err)
		default:
			// The default address is taken (another server runs):
			// serve gRPC all the same, and say so.
			fmt.Fprintf(stderr, "payments server: not serving Connect and HTTP: the default -http %s is taken (%v); pass -http with a free address, or -http '' to turn it off\n", *httpAddr, err)
		}
	}
	if hlis != nil {
		hs = newHTTPServer(connectHandler)
		defer hs.Close() // after a shutdown, a no-op
		go func() {
			if err := hs.Serve(hlis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				logger.Error("connect server stopped", "err", err)
			}
		}()
		fmt.Fprintf(stdout, "payments server serving Connect, gRPC-Web and gRPC on http://%s\n", hlis.Addr())
	}

	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	select {
	case err = <-served:
		// Serve failed on its own; nothing is left to drain.
	case <-ctx.Done():
		logger.Info("shutting down; waiting for running calls", "grace", *grace)
		var httpDone sync.WaitGroup
		if hs != nil {
			httpDone.Go(func() { shutdownHTTP(hs, *grace) })
		}
		stopGracefully(srv, *grace)
		httpDone.Wait()
		err = <-served
		if errors.Is(err, grpc.ErrServerStopped) {
			err = nil
		}
	}
	st := svc.Stats()
	fmt.Fprintf(stdout, "payments server stopped: %d executions (%d charges), %d replays, %d injected failures, %d key reuses refused, %d duplicates aborted, %d store errors\n",
		st.Executions, st.Charges, events.replayed.Load(), st.Injected, events.mismatch.Load(), events.conflict.Load(), events.storeError.Load())
	return err
}

// stopGracefully lets running calls finish for up to grace, then cuts off
// the rest. A call cut off mid-handler either charged and stored its
// outcome, or charged nothing and released its key: its client's retry, to
// this server once it is back or to another replica, is safe either way.
func stopGracefully(srv *grpc.Server, grace time.Duration) {
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		srv.Stop()
		<-done
	}
}

// newHTTPServer serves h over HTTP/1.1 and unencrypted HTTP/2 (h2c), so that
// curl, gRPC-Web and gRPC clients all reach it on one plain-text port.
func newHTTPServer(h http.Handler) *http.Server {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	return &http.Server{Handler: h, Protocols: &p, ReadHeaderTimeout: 10 * time.Second}
}

// shutdownHTTP lets running calls finish for up to grace, then closes the
// rest, as stopGracefully does for the gRPC server.
func shutdownHTTP(hs *http.Server, grace time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := hs.Shutdown(ctx); err != nil {
		_ = hs.Close()
	}
}
