package payments_test

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"
)

var metricsRE = regexp.MustCompile(`metrics on (http://\S+/metrics)`)

// scrape reads the server's /metrics and sums each series of the Charge
// method, by metric name (Prometheus's: idempotency_server_replays_total).
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	out := make(map[string]float64)
	sc := bufio.NewScanner(strings.NewReader(string(body)))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || !strings.HasPrefix(line, "idempotency_") {
			continue
		}
		name, rest, _ := strings.Cut(line, "{")
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok {
			name, value, _ = strings.Cut(line, " ")
		}
		if strings.HasPrefix(name, "idempotency_server_") && !strings.Contains(labels, `rpc_method="payments.v1.PaymentService/Charge"`) {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		require.NoError(t, err, "line %q", line)
		out[name] += v
	}
	return out
}

// Calls through the example server show in its /metrics, as OpenTelemetry's
// Prometheus exporter serves them: a first execution, its replays, a key
// reused for another request, and the bbolt store's group commits.
func TestServerMetrics(t *testing.T) {
	srv := startServer(t, "-store", "bolt", "-db", filepath.Join(t.TempDir(), "idem.db"), "-metrics", "127.0.0.1:0")
	m := metricsRE.FindStringSubmatch(srv.out.String())
	require.NotNil(t, m, "the server did not say where its metrics are:\n%s", srv.out)
	url := m[1]

	ps, err := runClient(t, srv.addr, "-mode", "unary", "-key", "metrics-1", "-n", "3", "-amount", "1000")
	require.NoError(t, err)
	require.Len(t, ps, 3)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client := paymentsv1.NewPaymentServiceClient(dial(t, srv.addr))
	kctx := metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, "metrics-1")
	_, err = client.Charge(kctx, &paymentsv1.ChargeRequest{Account: "acct_other", AmountCents: 5, Currency: "EUR"})
	require.Equal(t, codes.FailedPrecondition, status.Code(err), "%v", err)

	got := scrape(t, url)
	assert.Equal(t, 1.0, got["idempotency_server_executions_total"], "%v", got)
	assert.Equal(t, 2.0, got["idempotency_server_replays_total"], "%v", got)
	assert.Equal(t, 1.0, got["idempotency_server_mismatches_total"], "%v", got)
	assert.Equal(t, 1.0, got["idempotency_server_handler_duration_seconds_count"], "%v", got)
	assert.Equal(t, 1.0, got["idempotency_server_record_size_bytes_count"], "%v", got)
	assert.GreaterOrEqual(t, got["idempotency_bolt_commit_records_count"], 1.0, "%v", got)
	assert.GreaterOrEqual(t, got["idempotency_bolt_commit_records_sum"], 1.0, "%v", got)
	srv.stop(t)
}
