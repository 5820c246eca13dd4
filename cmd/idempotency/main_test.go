package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/grpcidem/idempotency"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// seed writes two records into a new bbolt store, as the interceptor would,
// and closes it.
func seed(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "idem.db")
	s, err := idempotency.OpenBolt(path)
	require.NoError(t, err)
	defer s.Close()
	st, err := status.New(codes.InvalidArgument, "amount must be positive").WithDetails(&errdetails.BadRequest{})
	require.NoError(t, err)
	now := time.Now()
	records := map[string]*idempotencyv1.Record{
		idempotency.StoreKey("tenant/a", "order-1"): {
			Method: "/payments.v1.PaymentService/Charge", Fingerprint: []byte{0xab, 0xcd},
			Status:    status.New(codes.OK, "").Proto(),
			Header:    []*idempotencyv1.Metadata{{Key: "x-sig-bin", Values: [][]byte{{0, 0xff}}}},
			Trailer:   []*idempotencyv1.Metadata{{Key: "x-ledger", Values: [][]byte{[]byte("entry-1")}}},
			Responses: [][]byte{[]byte("resp")},
			CreatedAt: timestamppb.New(now), ExpiresAt: timestamppb.New(now.Add(time.Hour)),
		},
		idempotency.StoreKey("", "bad-1"): {
			Method: "/payments.v1.PaymentService/Charge", Status: st.Proto(),
			CreatedAt: timestamppb.New(now), ExpiresAt: timestamppb.New(now.Add(time.Hour)),
		},
	}
	ctx := context.Background()
	for key, rec := range records {
		data, err := proto.Marshal(rec)
		require.NoError(t, err)
		_, err = s.Reserve(ctx, key, idempotency.Claim{Token: "t", Lease: time.Minute})
		require.NoError(t, err)
		require.NoError(t, s.Complete(ctx, key, "t", data, time.Hour))
	}
	return path
}

func cli(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestListShowForgetSweep(t *testing.T) {
	db := seed(t)

	code, out, errOut := cli("list", "-db", db)
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, `scope="tenant/a" key="order-1"  /payments.v1.PaymentService/Charge  OK  responses=1`)
	assert.Contains(t, out, `scope="" key="bad-1"  /payments.v1.PaymentService/Charge  InvalidArgument  responses=0`)
	assert.Contains(t, out, "2 records")

	code, out, _ = cli("list", "-db", db, "-limit", "1")
	require.Equal(t, 0, code)
	assert.Contains(t, out, "1 records")

	code, out, errOut = cli("show", "-db", db, "-scope", "tenant/a", "order-1")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, `status:      OK ""`)
	assert.Contains(t, out, "header:      x-sig-bin: 00ff")
	assert.Contains(t, out, `trailer:     x-ledger: "entry-1"`)
	assert.Contains(t, out, "response 1:  4 bytes")
	assert.Contains(t, out, "fingerprint: abcd")

	code, out, _ = cli("show", "-db", db, "bad-1")
	require.Equal(t, 0, code)
	assert.Contains(t, out, `status:      InvalidArgument "amount must be positive"`)
	assert.Contains(t, out, "detail:    type.googleapis.com/google.rpc.BadRequest")

	code, _, errOut = cli("show", "-db", db, "order-1")
	assert.Equal(t, 1, code, "the key exists only in scope tenant/a")
	assert.Contains(t, errOut, `no record for key "order-1" in scope ""`)

	code, out, errOut = cli("forget", "-db", db, "-scope", "tenant/a", "order-1")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "runs the handler again")
	code, _, _ = cli("show", "-db", db, "-scope", "tenant/a", "order-1")
	assert.Equal(t, 1, code, "forgotten")
	code, _, errOut = cli("forget", "-db", db, "-scope", "tenant/a", "order-1")
	assert.Equal(t, 1, code)
	assert.Contains(t, errOut, "no record")

	code, out, _ = cli("sweep", "-db", db)
	require.Equal(t, 0, code)
	assert.Contains(t, out, "swept 0 expired records")
	code, out, _ = cli("list", "-db", db)
	require.Equal(t, 0, code)
	assert.Contains(t, out, "1 records")
}

func TestUsageAndErrors(t *testing.T) {
	db := seed(t)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{nil, 2, "usage:"},
		{[]string{"drop"}, 2, `unknown command "drop"`},
		{[]string{"list"}, 2, "-db is required"},
		{[]string{"show", "-db", db}, 2, "exactly one KEY"},
		{[]string{"list", "-db", db, "extra"}, 2, "unexpected arguments"},
		{[]string{"list", "-db", filepath.Join(t.TempDir(), "missing.db")}, 1, "no such file"},
	} {
		code, _, errOut := cli(tc.args...)
		assert.Equal(t, tc.code, code, "%q", tc.args)
		assert.Contains(t, errOut, tc.want, "%q", tc.args)
	}

	// A running server holds the file: the tool says so instead of hanging.
	holdInAnotherProcess(t, db)
	start := time.Now()
	code, _, errOut := cli("list", "-db", db)
	assert.Equal(t, 1, code)
	assert.True(t, strings.Contains(errOut, "another process"), errOut)
	assert.Less(t, time.Since(start), 20*time.Second)
}

const holdEnv = "IDEMPOTENCY_CLI_HOLD_DB"

// holdInAnotherProcess opens the store at db in a second process, as a
// running server would, until the test ends. (In this process, OpenBolt
// would refuse at once with ErrAlreadyOpen.)
func holdInAnotherProcess(t *testing.T, db string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHoldInAnotherProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), holdEnv+"="+db)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "HELD\n", line)
}

// TestHoldInAnotherProcess is the second process of holdInAnotherProcess: it
// holds the store until its stdin closes.
func TestHoldInAnotherProcess(t *testing.T) {
	db := os.Getenv(holdEnv)
	if db == "" {
		t.Skip("the second process of holdInAnotherProcess")
	}
	s, err := idempotency.OpenBolt(db)
	require.NoError(t, err)
	defer s.Close()
	os.Stdout.WriteString("HELD\n")
	_, _ = io.Copy(io.Discard, os.Stdin)
}
