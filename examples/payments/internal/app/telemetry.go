package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/boltstore"
	"github.com/grpcidem/idempotency/examples/internal/stores"
	"github.com/grpcidem/idempotency/idemotel"
)

// metricsServer serves the idempotency metrics (package idemotel) as
// Prometheus text at /metrics, through OpenTelemetry's Prometheus exporter.
type metricsServer struct {
	tel    *idemotel.Telemetry
	mp     *sdkmetric.MeterProvider
	http   *http.Server
	served chan error
}

// startMetrics serves the metrics on addr when it is set (-metrics), says
// where on stdout, and has the store's bbolt commits measured too. It
// returns nil when addr is empty. Its options go to the idempotency Server.
func startMetrics(addr string, store *stores.Config, stdout io.Writer) (*metricsServer, error) {
	if addr == "" {
		return nil, nil
	}
	// A registry of its own, not Prometheus's global one: several servers
	// can run in one process (the tests).
	reg := prometheus.NewRegistry()
	exporter, err := otelprom.New(otelprom.WithRegisterer(reg))
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("-metrics %s: %w", addr, err)
	}
	m := &metricsServer{mp: sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter)), served: make(chan error, 1)}
	m.tel = idemotel.New(idemotel.WithMeterProvider(m.mp))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	m.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { m.served <- m.http.Serve(lis) }()
	store.BoltOptions = append(store.BoltOptions, boltstore.WithCommitObserver(m.tel.BoltCommits))
	fmt.Fprintf(stdout, "metrics on http://%s/metrics\n", lis.Addr())
	return m, nil
}

// options are the idempotency Server's options that feed the metrics.
func (m *metricsServer) options() []idempotency.Option {
	if m == nil {
		return nil
	}
	return []idempotency.Option{m.tel.ServerOption()}
}

// close stops serving the metrics.
func (m *metricsServer) close() error {
	if m == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := m.http.Shutdown(ctx)
	if serr := <-m.served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	return errors.Join(err, m.mp.Shutdown(ctx))
}

// demoMetrics are the demo's idempotency metrics, read in process at its
// end: the figures a -metrics server would serve.
type demoMetrics struct {
	tel    *idemotel.Telemetry
	reader *sdkmetric.ManualReader
}

func newDemoMetrics() *demoMetrics {
	reader := sdkmetric.NewManualReader()
	tel := idemotel.New(idemotel.WithMeterProvider(sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))))
	return &demoMetrics{tel: tel, reader: reader}
}

// print writes a few of the figures.
func (d *demoMetrics) print(w io.Writer) error {
	var rm metricdata.ResourceMetrics
	if err := d.reader.Collect(context.Background(), &rm); err != nil {
		return err
	}
	counts := make(map[string]int64)
	var commits uint64
	var records int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch data := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range data.DataPoints {
					counts[m.Name] += p.Value
				}
			case metricdata.Histogram[int64]:
				if m.Name == "idempotency.bolt.commit.records" {
					for _, p := range data.DataPoints {
						commits += p.Count
						records += p.Sum
					}
				}
			}
		}
	}
	fmt.Fprintf(w, "\nOpenTelemetry metrics of the run (what the server's -metrics serves):\n")
	for _, c := range []struct{ name, note string }{
		{"idempotency.server.executions", "handler runs, injected failures included"},
		{"idempotency.server.replays", "duplicates answered from the store"},
		{"idempotency.server.mismatches", "keys reused for another request"},
		{"idempotency.server.conflicts", "duplicates refused while the first ran"},
	} {
		fmt.Fprintf(w, "  %-31s %5d  %s\n", c.name, counts[c.name], c.note)
	}
	if commits > 0 {
		fmt.Fprintf(w, "  %-31s %5d  group commits, %.2f records each\n", "idempotency.bolt.commit.records", commits, float64(records)/float64(commits))
	}
	return nil
}
