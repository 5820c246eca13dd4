package payments_test

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/examples/payments/internal/app"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"
	"github.com/grpcidem/idempotency/examples/proto/payments/v1/paymentsv1connect"
	"github.com/grpcidem/idempotency/idemconnect"
)

var httpRE = regexp.MustCompile(`serving Connect, gRPC-Web and gRPC on (http://\S+)`)

// startHTTPServer starts the server command with its Connect listener on a
// free port, and returns it with the listener's base URL.
func startHTTPServer(t *testing.T, args ...string) (*server, string) {
	t.Helper()
	srv := startServer(t, append([]string{"-http", "127.0.0.1:0"}, args...)...)
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if m := httpRE.FindStringSubmatch(srv.out.String()); m != nil {
			return srv, m[1]
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("the server did not print its HTTP address:\n%s", srv.out)
	return nil, ""
}

// h2cClient speaks HTTP/2 without TLS, as gRPC over the Connect listener
// needs.
func h2cClient() *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: &p}}
}

// TestCurlChargesOnce is the README's curl command, run twice with one key:
// one charge id, the second answer marked as a replay; the same key over
// grpc-go gets the same charge (one store, one engine).
func TestCurlChargesOnce(t *testing.T) {
	srv, base := startHTTPServer(t, "-store", "bolt", "-db", t.TempDir()+"/idem.db")
	curlPath, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not installed; TestConnectProtocols covers the same over net/http")
	}
	curl := func(key, body string) (headers, json string) {
		out, err := exec.Command(curlPath, "-s", "-i", "-H", "Content-Type: application/json", "-H", "Idempotency-Key: "+key,
			"-d", body, base+"/payments.v1.PaymentService/Charge").CombinedOutput()
		require.NoError(t, err, "%s", out)
		head, b, ok := strings.Cut(strings.ReplaceAll(string(out), "\r\n", "\n"), "\n\n")
		require.True(t, ok, "%s", out)
		return head, b
	}
	body := `{"account":"a","amountCents":100,"currency":"EUR"}`
	h1, b1 := curl("k1", body)
	h2, b2 := curl("k1", body)
	var r1, r2 map[string]any
	require.NoError(t, json.Unmarshal([]byte(b1), &r1), b1)
	require.NoError(t, json.Unmarshal([]byte(b2), &r2), b2)
	require.NotEmpty(t, r1["chargeId"])
	assert.Equal(t, r1["chargeId"], r2["chargeId"])
	assert.True(t, strings.HasPrefix(h1, "HTTP/1.1 200"), h1)
	assert.NotContains(t, strings.ToLower(h1), "idempotency-replayed")
	assert.Contains(t, h2, "Idempotency-Replayed: true")

	// The same key through the gRPC port replays the same charge.
	var hdr metadata.MD
	resp, err := paymentsv1.NewPaymentServiceClient(dial(t, srv.addr)).Charge(
		metadata.AppendToOutgoingContext(context.Background(), idempotency.KeyHeader, "k1"),
		&paymentsv1.ChargeRequest{Account: "a", AmountCents: 100, Currency: "EUR"}, grpc.Header(&hdr))
	require.NoError(t, err)
	assert.Equal(t, r1["chargeId"], resp.ChargeId)
	assert.True(t, idempotency.IsReplayed(hdr))

	// Another amount under the same key, and no key at all.
	h3, b3 := curl("k1", `{"account":"a","amountCents":200,"currency":"EUR"}`)
	assert.True(t, strings.HasPrefix(h3, "HTTP/1.1 400"), h3)
	assert.Contains(t, b3, `"code":"failed_precondition"`)
	st := parseStats(t, srv.stop(t))
	assert.Equal(t, 1, st.executions)
	assert.Equal(t, 2, st.replays)
}

// TestConnectProtocols charges through the Connect listener with the
// connect-go client over each protocol, with the idemconnect client
// interceptor choosing and keeping the keys.
func TestConnectProtocols(t *testing.T) {
	srv, base := startHTTPServer(t, "-store", "memory")
	for _, p := range []struct {
		name string
		opts []connect.ClientOption
	}{
		{"connect", nil},
		{"grpc", []connect.ClientOption{connect.WithGRPC()}},
		{"grpcweb", []connect.ClientOption{connect.WithGRPCWeb()}},
	} {
		t.Run(p.name, func(t *testing.T) {
			opts := append(p.opts, connect.WithInterceptors(idemconnect.NewClientInterceptor()))
			client := paymentsv1connect.NewPaymentServiceClient(h2cClient(), base, opts...)
			req := connect.NewRequest(&paymentsv1.ChargeRequest{Account: "a", AmountCents: 100, Currency: "EUR"})
			req.Header().Set("X-Tenant", "t-"+p.name)
			first, err := client.Charge(context.Background(), req)
			require.NoError(t, err)
			key := req.Msg.RequestId
			require.Len(t, key, 36, "the client interceptor filled request_id, the key field payments.proto declares")

			again := connect.NewRequest(req.Msg)
			again.Header().Set("X-Tenant", "t-"+p.name)
			again.Header().Set("Idempotency-Key", key)
			second, err := client.Charge(context.Background(), again)
			require.NoError(t, err)
			assert.Equal(t, first.Msg.ChargeId, second.Msg.ChargeId)
			assert.True(t, idemconnect.IsReplayed(second.Header()))

			// Another tenant with the same key is another payment.
			other := connect.NewRequest(req.Msg)
			other.Header().Set("X-Tenant", "other-"+p.name)
			other.Header().Set("Idempotency-Key", key)
			third, err := client.Charge(context.Background(), other)
			require.NoError(t, err)
			assert.NotEqual(t, first.Msg.ChargeId, third.Msg.ChargeId)

			st, err := client.ChargeInstallments(context.Background(), connect.NewRequest(&paymentsv1.InstallmentsRequest{Account: "a", AmountCents: 90, Currency: "EUR", Count: 3}))
			require.NoError(t, err)
			n := 0
			for st.Receive() {
				n++
			}
			require.NoError(t, st.Err())
			assert.Equal(t, 3, n)
		})
	}
	_ = srv
}

// TestConnectRequiresKey: payments.proto requires a key on Charge, over HTTP
// too: 400 with a message naming the header.
func TestConnectRequiresKey(t *testing.T) {
	_, base := startHTTPServer(t, "-store", "memory")
	resp, err := http.Post(base+"/payments.v1.PaymentService/Charge", "application/json", strings.NewReader(`{"account":"a","amountCents":100,"currency":"EUR"}`))
	require.NoError(t, err)
	defer resp.Body.Close()
	var body map[string]string
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&body))
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode)
	assert.Equal(t, "invalid_argument", body["code"])
	assert.Contains(t, body["message"], "idempotency-key")
}

// TestDefaultHTTPAddressTaken: with the default -http address taken (another
// server runs), the server still serves gRPC and says why it does not serve
// HTTP; an -http address given explicitly and taken is an error.
func TestDefaultHTTPAddressTaken(t *testing.T) {
	if l, err := net.Listen("tcp", "127.0.0.1:8080"); err == nil {
		t.Cleanup(func() { _ = l.Close() })
	} // else something else holds it already: the same case
	ctx, cancel := context.WithCancel(context.Background())
	out, errOut := &syncBuffer{ready: make(chan string, 1)}, &syncBuffer{}
	done := make(chan error, 1)
	go func() { done <- app.RunServer(ctx, []string{"-addr", "127.0.0.1:0", "-store", "memory"}, out, errOut) }()
	select {
	case addr := <-out.ready:
		_, err := paymentsv1.NewPaymentServiceClient(dial(t, addr)).GetCharge(context.Background(), &paymentsv1.GetChargeRequest{ChargeId: "ch_none"})
		assert.NotNil(t, err) // NotFound: the gRPC port serves
		assert.Contains(t, errOut.String(), "not serving Connect and HTTP: the default -http 127.0.0.1:8080 is taken")
	case err := <-done:
		t.Fatalf("the server did not start: %v\n%s", err, errOut)
	case <-time.After(time.Minute):
		t.Fatal("the server did not start within a minute")
	}
	cancel()
	require.NoError(t, <-done)

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	err = app.RunServer(context.Background(), []string{"-addr", "127.0.0.1:0", "-store", "memory", "-http", l.Addr().String()}, io.Discard, io.Discard)
	assert.ErrorContains(t, err, "-http "+l.Addr().String())
}
