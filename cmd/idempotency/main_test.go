package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/internal/boltraw"
	// The test PaymentService, linked in (and so registered) only in this
	// test binary: show prints its responses as protojson.
	"github.com/grpcidem/idempotency/internal/testpb"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"

	"github.com/grpcidem/idempotency/boltstore"
)

// seed writes two records into a new bbolt store, as the interceptor would,
// and closes it.
func seed(t *testing.T) string {
	t.Helper()
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
	return seedRecords(t, records)
}

// seedRecords writes records, by store key, into a new bbolt store, as the
// interceptor would, and closes it.
func seedRecords(t *testing.T, records map[string]*idempotencyv1.Record) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "idem.db")
	s, err := boltstore.Open(path)
	require.NoError(t, err)
	defer s.Close()
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
	assert.Contains(t, out, "1 of 2 records shown")

	code, out, errOut = cli("show", "-db", db, "-scope", "tenant/a", "order-1")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, `status:      OK ""`)
	assert.Contains(t, out, "header:      x-sig-bin: AP8=")
	assert.Contains(t, out, `trailer:     x-ledger: "entry-1"`)
	assert.Contains(t, out, "response 1:  4 bytes")
	assert.Contains(t, out, "fingerprint: abcd")

	code, out, _ = cli("show", "-db", db, "bad-1")
	require.Equal(t, 0, code)
	assert.Contains(t, out, `status:      InvalidArgument "amount must be positive"`)
	assert.Contains(t, out, "detail 1:    type.googleapis.com/google.rpc.BadRequest\n  {\n    \"@type\": \"type.googleapis.com/google.rpc.BadRequest\"\n  }\n")

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
	assert.Contains(t, out, "1 record\n")
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
		{[]string{"list", "-db", db, "-addr", "127.0.0.1:1"}, 2, "not both"},
		{[]string{"list", "-db", db, "-token", "t"}, 2, "-token and -insecure go with -addr"},
		{[]string{"list", "-db", db, "-prefix", "order-"}, 2, "-prefix PREFIX needs -scope"},
		{[]string{"sweep", "-addr", "127.0.0.1:1"}, 2, "flag provided but not defined: -addr"},
		{[]string{"list", "-addr", "no-port"}, 2, "give HOST:PORT"},
		{[]string{"stats", "-addr", "127.0.0.1:1"}, 1, "is it the admin listener of a running server"},
		{[]string{"list", "-db", filepath.Join(t.TempDir(), "missing.db")}, 1, "no such file"},
		{[]string{"salvage", "-db", db}, 2, "-out NEW is required"},
		{[]string{"list", "-db", db, "-out", "x.db"}, 2, "flag provided but not defined: -out"},
		{[]string{"salvage", "-db", db, "-out", db}, 1, "exists"},
		{[]string{"check", "-db", filepath.Join(t.TempDir(), "missing.db")}, 1, "no such file"},
	} {
		code, _, errOut := cli(tc.args...)
		assert.Equal(t, tc.code, code, "%q", tc.args)
		assert.Contains(t, errOut, tc.want, "%q", tc.args)
	}

	// A running server holds the file: the tool says so instead of hanging.
	holdInAnotherProcess(t, db)
	for _, cmd := range []string{"list", "check", "salvage"} {
		args := []string{cmd, "-db", db}
		if cmd == "salvage" {
			args = append(args, "-out", filepath.Join(t.TempDir(), "new.db"))
		}
		start := time.Now()
		code, _, errOut := cli(args...)
		assert.Equal(t, 1, code, cmd)
		assert.True(t, strings.Contains(errOut, "another process"), "%s: %s", cmd, errOut)
		assert.Less(t, time.Since(start), 20*time.Second, cmd)
	}
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
	s, err := boltstore.Open(db)
	require.NoError(t, err)
	defer s.Close()
	os.Stdout.WriteString("HELD\n")
	_, _ = io.Copy(io.Discard, os.Stdin)
}

// seedMany writes n records of a few hundred bytes each into a new bbolt
// store, as the interceptor would, and closes it: the records' bucket spans
// many leaf pages.
func seedMany(t *testing.T, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "idem.db")
	s, err := boltstore.Open(path)
	require.NoError(t, err)
	defer s.Close()
	ctx := context.Background()
	now := time.Now()
	for i := range n {
		data, err := proto.Marshal(&idempotencyv1.Record{
			Method: "/payments.v1.PaymentService/Charge", Fingerprint: bytes.Repeat([]byte{byte(i)}, 32),
			Status:    status.New(codes.OK, "").Proto(),
			Responses: [][]byte{bytes.Repeat([]byte("r"), 100)},
			CreatedAt: timestamppb.New(now), ExpiresAt: timestamppb.New(now.Add(time.Hour)),
		})
		require.NoError(t, err)
		require.NoError(t, s.Complete(ctx, idempotency.StoreKey("", fmt.Sprintf("order-%04d", i)), "t", data, time.Hour))
	}
	return path
}

// damagePage overwrites the header of a leaf page of the records, neither
// the first nor the last, with one that claims to be another page: bbolt
// panics when it reaches that page. It returns the page's number and the
// store keys on it.
func damagePage(t *testing.T, path string) (uint64, []string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	info, err := f.Stat()
	require.NoError(t, err)
	rf, err := boltraw.Open(f, info.Size())
	require.NoError(t, err)
	w := rf.NewWalker()
	var records *boltraw.Bucket
	w.Walk(rf.RootBucket(), func(e boltraw.Elem) bool {
		if string(e.Key) == boltstore.DefaultBucket {
			b, err := boltraw.ParseBucket(e.Value)
			require.NoError(t, err)
			records = &b
		}
		return true
	}, func(p boltraw.Problem) { t.Fatal(p) })
	require.NotNil(t, records)
	var leaves []*boltraw.Page
	w.Pages = func(p *boltraw.Page, _ int) {
		if p.IsLeaf() {
			leaves = append(leaves, p)
		}
	}
	w.Walk(*records, func(boltraw.Elem) bool { return true }, func(p boltraw.Problem) { t.Fatal(p) })
	require.Greater(t, len(leaves), 2)
	leaf := leaves[len(leaves)/2]
	elems, _, err := leaf.Elems()
	require.NoError(t, err)
	var keys []string
	for _, e := range elems {
		keys = append(keys, string(e.Key))
	}
	_, err = f.WriteAt([]byte{0xef, 0xbe, 0xad, 0xde, 0, 0, 0, 0, 0x5a, 0x5a}, int64(leaf.ID)*int64(rf.Meta.PageSize))
	require.NoError(t, err)
	return leaf.ID, keys
}

// TestCheckAndSalvage recovers a file with a damaged page as
// docs/bbolt-recovery.md says: check reports the damage (exit 1, never a
// panic), salvage copies the readable records into a new file and says
// how many it copied and how many it could not, and the new file passes the
// check and serves its records.
func TestCheckAndSalvage(t *testing.T) {
	db := seedMany(t, 300)
	code, out, errOut := cli("check", "-db", db)
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "ok: 300 records (0 expired)")

	page, lost := damagePage(t, db)
	code, out, errOut = cli("check", "-db", db)
	assert.Equal(t, 1, code, "a damaged file fails the check")
	assert.Empty(t, errOut)
	assert.Contains(t, out, db+": DAMAGED")
	assert.Contains(t, out, fmt.Sprintf("page %d identifies as page", page))
	assert.Contains(t, out, "idempotency salvage -db "+db+" -out NEW")
	t.Log(out)

	// The store itself reports the damage as an error too.
	code, _, errOut = cli("list", "-db", db)
	assert.Equal(t, 1, code)
	assert.Contains(t, errOut, "bbolt file is corrupt")

	salvaged := filepath.Join(t.TempDir(), "salvaged.db")
	code, out, errOut = cli("salvage", "-db", db, "-out", salvaged)
	require.Equal(t, 0, code, errOut)
	t.Log(out)
	var copied, skipped, lostPages, expired int
	_, err := fmt.Sscanf(out[strings.Index(out, "copied "):], "copied %d records to "+salvaged+"; skipped %d unreadable records; %d unreadable pages of records lost; %d expired",
		&copied, &skipped, &lostPages, &expired)
	require.NoError(t, err, out)
	assert.Equal(t, 1, lostPages)
	assert.Zero(t, skipped)
	assert.Equal(t, 300-len(lost), copied)
	assert.Contains(t, out, salvaged+" passes the check")
	assert.Contains(t, out, "run the handler again")

	code, out, errOut = cli("check", "-db", salvaged)
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, fmt.Sprintf("ok: %d records", copied))
	code, out, errOut = cli("list", "-db", salvaged)
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, fmt.Sprintf("%d records", copied))
	code, out, errOut = cli("show", "-db", salvaged, "order-0299")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "response 1:  100 bytes")
	_, key, _ := idempotency.SplitStoreKey(lost[0])
	code, _, errOut = cli("show", "-db", salvaged, key)
	assert.Equal(t, 1, code, "%s was on the lost page", key)
	assert.Contains(t, errOut, "no record")

	// The damaged file was not changed.
	code, _, _ = cli("check", "-db", db)
	assert.Equal(t, 1, code)
}

// TestCheckAndSalvageNeverPanic runs check and salvage on files damaged in
// the ways bbolt crashes on: a readable report and an exit code, never a
// panic; salvage copies what it can or says why it cannot.
func TestCheckAndSalvageNeverPanic(t *testing.T) {
	good, err := os.ReadFile(seedMany(t, 300))
	require.NoError(t, err)
	for _, tc := range []struct {
		name       string
		damage     func(b []byte) []byte
		salvagable bool
	}{
		{"data pages XORed", func(b []byte) []byte {
			for i := 2 * 4096; i < len(b); i++ {
				b[i] ^= 0x5a
			}
			return b
		}, false},
		{"truncated to half", func(b []byte) []byte { return b[:len(b)/2] }, true},
		{"truncated mid-page", func(b []byte) []byte { return b[:len(b)/2+100] }, true},
		{"garbage meta pages", func(b []byte) []byte {
			for i := range 2 * 4096 {
				b[i] = byte(i*7 + 3)
			}
			return b
		}, false},
		{"one meta page garbage", func(b []byte) []byte {
			for i := range 4096 {
				b[i] = byte(i*7 + 3)
			}
			return b
		}, true},
		{"a few bytes", func([]byte) []byte { return []byte("not a bbolt file") }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := filepath.Join(t.TempDir(), "idem.db")
			require.NoError(t, os.WriteFile(db, tc.damage(append([]byte(nil), good...)), 0o600))
			code, out, errOut := cli("check", "-db", db)
			t.Log(out, errOut)
			assert.Equal(t, 1, code)
			assert.Contains(t, out, "DAMAGED")

			salvaged := filepath.Join(t.TempDir(), "salvaged.db")
			code, out, errOut = cli("salvage", "-db", db, "-out", salvaged)
			t.Log(out, errOut)
			if !tc.salvagable {
				assert.Equal(t, 1, code)
				assert.Contains(t, errOut, "bbolt file is corrupt")
				return
			}
			require.Equal(t, 0, code)
			assert.Contains(t, out, "passes the check")
			assert.NotContains(t, out, "copied 0 records")
			code, out, errOut = cli("list", "-db", salvaged)
			assert.Equal(t, 0, code, errOut)
			t.Log(out[strings.LastIndex(out[:len(out)-1], "\n")+1:])
		})
	}
}

// okRecord is a successful unary record of method, with one response.
func okRecord(method string, response []byte) *idempotencyv1.Record {
	now := time.Now()
	return &idempotencyv1.Record{
		Method: method, Fingerprint: []byte{0x01, 0x23},
		Status:    status.New(codes.OK, "").Proto(),
		Responses: [][]byte{response},
		CreatedAt: timestamppb.New(now), ExpiresAt: timestamppb.New(now.Add(time.Hour)),
	}
}

// TestFlagsAnywhere runs commands with their flags before, between and after
// the command and KEY, as operators type them: each finds the record in
// scope "public" (the payments example's scope) and none reports a missing
// -db. Before, flags after KEY were left unparsed: "-db is required".
func TestFlagsAnywhere(t *testing.T) {
	db := seedRecords(t, map[string]*idempotencyv1.Record{
		idempotency.StoreKey("public", "order-1"): okRecord("/payments.v1.PaymentService/Charge", []byte("r")),
		idempotency.StoreKey("public", "-dash"):   okRecord("/payments.v1.PaymentService/Charge", []byte("r")),
	})
	for _, tc := range []struct {
		args []string
		code int
		want string // on stdout for 0, stderr otherwise
	}{
		{[]string{"show", "order-1", "-db", db, "-scope", "public"}, 0, `scope:       "public"`},
		{[]string{"show", "-db", db, "order-1", "-scope", "public"}, 0, `scope:       "public"`},
		{[]string{"show", "-scope", "public", "order-1", "-db", db}, 0, `scope:       "public"`},
		{[]string{"show", "order-1", "-db=" + db, "--scope=public"}, 0, `scope:       "public"`},
		{[]string{"-db", db, "show", "-scope", "public", "order-1"}, 0, `scope:       "public"`},
		{[]string{"-db", db, "-scope", "public", "show", "order-1"}, 0, `scope:       "public"`},
		{[]string{"forget", "order-1", "-db", db, "-scope", "public"}, 0, `forgot key "order-1" in scope "public"`},
		// After a "--" that ends the flags, what looks like a flag is a KEY.
		{[]string{"show", "-db", db, "-scope", "public", "--", "-dash"}, 0, `key:         "-dash"`},
		{[]string{"show", "-db", db, "--", "-dash", "-scope"}, 2, "exactly one KEY"},
		// A "--" that is -scope's value does not end the flags: the key is
		// looked up in scope "--".
		{[]string{"show", "-db", db, "-scope", "--", "--", "order-1"}, 1, `no record for key "order-1" in scope "--"`},
	} {
		code, out, errOut := cli(tc.args...)
		assert.Equal(t, tc.code, code, "%q: %s", tc.args, errOut)
		if tc.code == 0 {
			assert.Contains(t, out, tc.want, "%q", tc.args)
			assert.Empty(t, errOut, "%q", tc.args)
		} else {
			assert.Contains(t, errOut, tc.want, "%q", tc.args)
		}
	}
	for _, args := range [][]string{
		{"list", "-limit", "1", "-db", db},
		{"list", "-db", db, "-limit", "1"},
		{"-limit", "1", "list", "-db", db},
	} {
		code, out, errOut := cli(args...)
		assert.Equal(t, 0, code, "%q: %s", args, errOut)
		assert.Equal(t, 1, strings.Count(out, "scope="), "%q: -limit 1 obeyed: %s", args, out)
	}
}

// TestHelp asks for help every way a Go tool takes it: the usage goes to
// stdout and the exit status is 0. Asking for a command that does not exist,
// or for nothing at all, is a usage error: usage on stderr, exit 2. Before,
// -h and help were "unknown command".
func TestHelp(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // on stdout
	}{
		{[]string{"-h"}, "usage: idempotency COMMAND"},
		{[]string{"-help"}, "usage: idempotency COMMAND"},
		{[]string{"--help"}, "usage: idempotency COMMAND"},
		{[]string{"help"}, "usage: idempotency COMMAND"},
		{[]string{"help", "show"}, "usage: idempotency show -db FILE"},
		{[]string{"show", "-h"}, "usage: idempotency show -db FILE"},
		{[]string{"show", "--help"}, "usage: idempotency show -db FILE"},
		{[]string{"show", "order-1", "-db", "x.db", "-h"}, "usage: idempotency show -db FILE"},
		{[]string{"list", "-help"}, "usage: idempotency list -db FILE"},
		{[]string{"help", "forget"}, "usage: idempotency forget -db FILE"},
		{[]string{"help", "sweep"}, "usage: idempotency sweep -db FILE"},
		{[]string{"help", "check"}, "usage: idempotency check -db FILE"},
		{[]string{"salvage", "-h"}, "usage: idempotency salvage -db FILE -out NEW"},
	} {
		code, out, errOut := cli(tc.args...)
		assert.Equal(t, 0, code, "%q", tc.args)
		assert.Contains(t, out, tc.want, "%q", tc.args)
		assert.Empty(t, errOut, "%q", tc.args)
	}

	// The examples name the file and the scope the payments example's server
	// writes (examples/payments/internal/app: -db payments-idem.db, tenant
	// "public"), not ones it never does.
	_, out, _ := cli("help")
	for _, want := range []string{
		"idempotency list -db payments-idem.db",
		"idempotency show -db payments-idem.db -scope public order-1001",
		"idempotency forget -db payments-idem.db -scope public order-1001",
	} {
		assert.Contains(t, out, want)
	}
	for _, args := range [][]string{{"help"}, {"help", "show"}, {"help", "list"}, {"help", "forget"}, {"help", "salvage"}} {
		_, out, _ := cli(args...)
		assert.Contains(t, out, "payments-idem.db", "%q", args)
		assert.NotContains(t, out, "idempotency.db", "%q", args)
		assert.NotContains(t, out, "tenant-a", "%q", args)
	}
	_, out, _ = cli("help", "show")
	assert.Contains(t, out, "-scope public")

	for _, tc := range []struct {
		args []string
		want string // on stderr
	}{
		{nil, "usage: idempotency COMMAND"},
		{[]string{"drop"}, "idempotency: unknown command \"drop\"\n\nusage: idempotency COMMAND"},
		{[]string{"help", "drop"}, "idempotency help: unknown command \"drop\"\n\nusage: idempotency COMMAND"},
		{[]string{"-db", "x.db"}, "idempotency: no command given"},
	} {
		code, out, errOut := cli(tc.args...)
		assert.Equal(t, 2, code, "%q", tc.args)
		assert.Contains(t, errOut, tc.want, "%q", tc.args)
		assert.Empty(t, out, "%q", tc.args)
	}
}

// TestUsageErrorsExit2 checks that every command refuses a command line it
// cannot run with a message, its usage line and exit status 2, before it
// touches any file: a missing -db above all.
func TestUsageErrorsExit2(t *testing.T) {
	db := seed(t)
	type tc struct {
		args []string
		want string
	}
	var cases []tc
	for _, cmd := range []string{"list", "show", "forget", "sweep", "check", "salvage"} {
		args := []string{cmd}
		switch cmd {
		case "show", "forget":
			args = append(args, "order-1", "-scope", "public")
		case "salvage":
			args = append(args, "-out", filepath.Join(t.TempDir(), "new.db"))
		}
		cases = append(cases, tc{args, "idempotency " + cmd + ": -db is required"})
	}
	cases = append(cases,
		tc{[]string{"show", "-db", db}, "idempotency show: give exactly one KEY"},
		tc{[]string{"forget", "-db", db, "a", "b"}, "idempotency forget: give exactly one KEY"},
		tc{[]string{"sweep", "-db", db, "extra"}, `idempotency sweep: unexpected arguments ["extra"]`},
		tc{[]string{"show", "-db", db, "-bogus", "k"}, "idempotency show: flag provided but not defined: -bogus"},
		tc{[]string{"list", "-db", db, "-limit", "x"}, `idempotency list: invalid value "x" for flag -limit`},
		tc{[]string{"list", "-db", db, "-limit", "-1"}, "idempotency list: -limit is -1"},
		tc{[]string{"check", "-db", db, "-scope", "public"}, "idempotency check: flag provided but not defined: -scope"},
		tc{[]string{"salvage", "-db", db}, "idempotency salvage: -out NEW is required"},
		tc{[]string{"show", "-db"}, "idempotency show: flag needs an argument: -db"},
	)
	for _, c := range cases {
		code, out, errOut := cli(c.args...)
		assert.Equal(t, 2, code, "%q", c.args)
		assert.Contains(t, errOut, c.want, "%q", c.args)
		assert.Contains(t, errOut, "usage: idempotency "+c.args[0], "%q", c.args)
		assert.Empty(t, out, "%q", c.args)
	}
}

// TestListLimitCountsAll checks list's summary against the file: -limit
// bounds the lines printed, not the count. Before, `list -limit 3` on a file
// of 11 records said "3 records".
func TestListLimitCountsAll(t *testing.T) {
	records := map[string]*idempotencyv1.Record{}
	for i := range 11 {
		records[idempotency.StoreKey("public", fmt.Sprintf("order-%02d", i))] = okRecord("/payments.v1.PaymentService/Charge", []byte("r"))
	}
	db := seedRecords(t, records)
	one := seedRecords(t, map[string]*idempotencyv1.Record{
		idempotency.StoreKey("public", "order-1"): okRecord("/payments.v1.PaymentService/Charge", []byte("r")),
	})
	for _, tc := range []struct {
		args    []string
		lines   int
		summary string
	}{
		{[]string{"list", "-db", db, "-limit", "3"}, 3, "3 of 11 records shown (-limit 3; -limit 0 shows all)\n"},
		{[]string{"list", "-limit", "10", "-db", db}, 10, "10 of 11 records shown"},
		{[]string{"list", "-db", db, "-limit", "11"}, 11, "11 records\n"},
		{[]string{"list", "-db", db, "-limit", "50"}, 11, "11 records\n"},
		{[]string{"list", "-db", db}, 11, "11 records\n"},
		{[]string{"list", "-db", one}, 1, "1 record\n"},
	} {
		code, out, errOut := cli(tc.args...)
		require.Equal(t, 0, code, "%q: %s", tc.args, errOut)
		assert.Equal(t, tc.lines, strings.Count(out, "scope=\"public\""), "%q", tc.args)
		last := out[strings.LastIndex(strings.TrimSuffix(out, "\n"), "\n")+1:]
		assert.True(t, strings.HasPrefix(last, tc.summary), "%q: the summary is %q", tc.args, last)
	}
}

// showRecords are the records TestShow* show: a unary call and a server
// stream of the test PaymentService (linked into this test binary), a
// failed call with a standard and an unknown status detail, and a call of a
// service this binary does not know.
func showRecords(t *testing.T) (db string, unknownResponse []byte) {
	t.Helper()
	charge := func(id string, cents int64) []byte {
		b, err := proto.Marshal(&testpb.ChargeResponse{ChargeId: id, Account: "acct_demo", AmountCents: cents, Currency: "EUR"})
		require.NoError(t, err)
		return b
	}
	unary := okRecord(testpb.PaymentService_Charge_FullMethodName, charge("ch_1", 1250))
	unary.Fingerprint = []byte{0xab, 0xcd}
	unary.Header = []*idempotencyv1.Metadata{{Key: "x-sig-bin", Values: [][]byte{{0, 0xff}}}, {Key: "x-request-id", Values: [][]byte{[]byte("r-1")}}}
	unary.Trailer = []*idempotencyv1.Metadata{{Key: "x-ledger", Values: [][]byte{[]byte("entry-1"), []byte("entry-2")}}}

	stream := okRecord(testpb.PaymentService_ChargeInstallments_FullMethodName, charge("ch_2", 600))
	// A field ChargeResponse does not define, as a newer server would send.
	stream.Responses = append(stream.Responses, protowire.AppendVarint(protowire.AppendTag(charge("ch_3", 650), 15, protowire.VarintType), 3))

	st, err := status.New(codes.InvalidArgument, "amount must be positive").WithDetails(&errdetails.BadRequest{
		FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: "amount_cents", Description: "must be positive"}},
	})
	require.NoError(t, err)
	sp := st.Proto()
	reason := protowire.AppendTag(nil, 1, protowire.VarintType)
	reason = protowire.AppendVarint(reason, 7)
	reason = protowire.AppendTag(reason, 2, protowire.BytesType)
	reason = protowire.AppendString(reason, "card declined")
	sp.Details = append(sp.Details, &anypb.Any{TypeUrl: "type.googleapis.com/acme.v1.Reason", Value: reason})
	failed := okRecord(testpb.PaymentService_Charge_FullMethodName, nil)
	failed.Status, failed.Responses = sp, nil

	// A response of a service this binary does not link in, field by field.
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.BytesType)
	b = protowire.AppendString(b, "ch_9")
	b = protowire.AppendTag(b, 2, protowire.VarintType)
	b = protowire.AppendVarint(b, 1250)
	var nested []byte
	nested = protowire.AppendTag(nested, 1, protowire.VarintType)
	nested = protowire.AppendVarint(nested, 7)
	nested = protowire.AppendTag(nested, 2, protowire.BytesType)
	nested = protowire.AppendString(nested, "EUR")
	b = protowire.AppendTag(b, 3, protowire.BytesType)
	b = protowire.AppendBytes(b, nested)
	b = protowire.AppendTag(b, 4, protowire.Fixed32Type)
	b = protowire.AppendFixed32(b, math.Float32bits(1.5))
	b = protowire.AppendTag(b, 5, protowire.Fixed64Type)
	b = protowire.AppendFixed64(b, math.Float64bits(2.25))
	b = protowire.AppendTag(b, 6, protowire.BytesType)
	b = protowire.AppendBytes(b, []byte{0xff, 0xfe, 0x00})
	b = protowire.AppendTag(b, 7, protowire.VarintType)
	b = protowire.AppendVarint(b, protowire.EncodeZigZag(-5)) // sint64 -5 is 9
	b = protowire.AppendTag(b, 8, protowire.VarintType)
	minus5 := int64(-5)
	b = protowire.AppendVarint(b, uint64(minus5)) // int64 -5
	unknown := okRecord("/acme.ledger.v2.Ledger/Post", b)

	return seedRecords(t, map[string]*idempotencyv1.Record{
		idempotency.StoreKey("public", "order-1"):  unary,
		idempotency.StoreKey("public", "order-2"):  stream,
		idempotency.StoreKey("public", "bad-1"):    failed,
		idempotency.StoreKey("public", "ledger-1"): unknown,
	}), b
}

// TestShowPrintsPayload checks that show prints what was stored, not its
// size: responses whose type is linked in as protojson (with the fields
// the type does not define as wire fields), status details the same way,
// -bin metadata in base64, and the responses of an unknown service as their
// wire fields, nested messages decoded. Before, show printed "response 1:
// 34 bytes".
func TestShowPrintsPayload(t *testing.T) {
	db, _ := showRecords(t)
	for _, tc := range []struct {
		key  string
		want []string
	}{
		{"order-1", []string{
			"method:      /idempotency.testing.v1.PaymentService/Charge\n",
			`status:      OK ""` + "\n",
			"fingerprint: abcd\n",
			"header:      x-sig-bin: AP8=\n",
			`header:      x-request-id: "r-1"` + "\n",
			`trailer:     x-ledger: "entry-1", "entry-2"` + "\n",
			"response 1:  ", " bytes of idempotency.testing.v1.ChargeResponse:\n" +
				"  {\n" +
				`    "chargeId": "ch_1",` + "\n" +
				`    "account": "acct_demo",` + "\n" +
				`    "amountCents": "1250",` + "\n" +
				`    "currency": "EUR"` + "\n" +
				"  }\n",
		}},
		{"order-2", []string{
			"response 1:  ", `"chargeId": "ch_2"`,
			"response 2:  ", `"chargeId": "ch_3"`,
			"  fields idempotency.testing.v1.ChargeResponse does not define:\n    15 (varint): 3\n",
		}},
		{"bad-1", []string{
			`status:      InvalidArgument "amount must be positive"` + "\n",
			"detail 1:    type.googleapis.com/google.rpc.BadRequest\n" +
				"  {\n" +
				`    "@type": "type.googleapis.com/google.rpc.BadRequest",` + "\n" +
				`    "fieldViolations": [` + "\n" +
				"      {\n" +
				`        "field": "amount_cents",` + "\n" +
				`        "description": "must be positive"` + "\n" +
				"      }\n" +
				"    ]\n" +
				"  }\n",
			"detail 2:    type.googleapis.com/acme.v1.Reason  17 bytes (its type is not linked into this tool), wire fields:\n" +
				"  1 (varint): 7\n" +
				`  2 (bytes): "card declined"` + "\n",
			"responses:   none\n",
		}},
		{"ledger-1", []string{
			"method:      /acme.ledger.v2.Ledger/Post\n",
			"responses:   1, as wire fields: the response type of /acme.ledger.v2.Ledger/Post is unknown: service acme.ledger.v2.Ledger is not linked into this tool\n" +
				"response 1:  50 bytes, wire fields:\n" +
				`  1 (bytes): "ch_9"` + "\n" +
				"  2 (varint): 1250\n" +
				"  3 (bytes): {\n" +
				"    1 (varint): 7\n" +
				`    2 (bytes): "EUR"` + "\n" +
				"  }\n" +
				"  4 (fixed32): 1069547520 (0x3fc00000, float 1.5)\n" +
				"  5 (fixed64): 4612248968380809216 (0x4002000000000000, double 2.25)\n" +
				"  6 (bytes): 3 bytes fffe00\n" +
				"  7 (varint): 9\n" +
				"  8 (varint): 18446744073709551611 (int64 -5)\n",
		}},
	} {
		code, out, errOut := cli("show", "-db", db, "-scope", "public", tc.key)
		require.Equal(t, 0, code, errOut)
		for _, want := range tc.want {
			assert.Contains(t, out, want, tc.key)
		}
		assert.NotContains(t, out, "bytes\n", "%s: a bare size", tc.key)
	}
}

// TestShowJSON checks show -json: one JSON object a script can read, with
// the same content as the human form.
func TestShowJSON(t *testing.T) {
	db, unknownResponse := showRecords(t)
	show := func(key string) map[string]any {
		t.Helper()
		code, out, errOut := cli("show", key, "-json", "-db", db, "-scope", "public")
		require.Equal(t, 0, code, errOut)
		dec := json.NewDecoder(strings.NewReader(out))
		var v map[string]any
		require.NoError(t, dec.Decode(&v), out)
		_, err := dec.Token()
		require.ErrorIs(t, err, io.EOF, "one object, nothing after it")
		return v
	}
	type obj = map[string]any
	type arr = []any

	v := show("order-1")
	assert.Equal(t, "public", v["scope"])
	assert.Equal(t, "order-1", v["key"])
	assert.Equal(t, "/idempotency.testing.v1.PaymentService/Charge", v["method"])
	assert.Equal(t, "abcd", v["fingerprint"])
	assert.Equal(t, obj{"code": 0.0, "codeName": "OK", "message": "", "details": arr{}}, v["status"])
	assert.Equal(t, obj{"x-sig-bin": arr{"AP8="}, "x-request-id": arr{"r-1"}}, v["header"])
	assert.Equal(t, obj{"x-ledger": arr{"entry-1", "entry-2"}}, v["trailer"])
	for _, k := range []string{"createdAt", "expiresAt"} {
		_, err := time.Parse(time.RFC3339Nano, v[k].(string))
		assert.NoError(t, err, k)
	}
	require.Len(t, v["responses"], 1)
	r := v["responses"].(arr)[0].(obj)
	assert.Equal(t, "idempotency.testing.v1.ChargeResponse", r["type"])
	assert.Equal(t, obj{"chargeId": "ch_1", "account": "acct_demo", "amountCents": "1250", "currency": "EUR"}, r["message"])
	assert.NotContains(t, r, "wire")

	v = show("bad-1")
	assert.Equal(t, 3.0, v["status"].(obj)["code"])
	assert.Equal(t, "InvalidArgument", v["status"].(obj)["codeName"])
	details := v["status"].(obj)["details"].(arr)
	require.Len(t, details, 2)
	assert.Equal(t, obj{"@type": "type.googleapis.com/google.rpc.BadRequest",
		"fieldViolations": arr{obj{"field": "amount_cents", "description": "must be positive"}}}, details[0])
	reason := details[1].(obj)
	assert.Equal(t, "type.googleapis.com/acme.v1.Reason", reason["@type"])
	assert.Equal(t, arr{
		obj{"field": 1.0, "wire": "varint", "value": 7.0},
		obj{"field": 2.0, "wire": "bytes", "string": "card declined"},
	}, reason["wire"])
	assert.Equal(t, arr{}, v["responses"])

	v = show("ledger-1")
	r = v["responses"].([]any)[0].(obj)
	assert.NotContains(t, r, "type")
	assert.NotContains(t, r, "message")
	assert.Contains(t, r["note"], "service acme.ledger.v2.Ledger is not linked into this tool")
	assert.Equal(t, base64.StdEncoding.EncodeToString(unknownResponse), r["bytes"])
	assert.Equal(t, float64(len(unknownResponse)), r["size"])
	wire := r["wire"].(arr)
	require.Len(t, wire, 8)
	assert.Equal(t, obj{"field": 1.0, "wire": "bytes", "string": "ch_9"}, wire[0])
	assert.Equal(t, obj{"field": 3.0, "wire": "bytes", "message": arr{
		obj{"field": 1.0, "wire": "varint", "value": 7.0},
		obj{"field": 2.0, "wire": "bytes", "string": "EUR"},
	}}, wire[2])
	assert.Equal(t, obj{"field": 6.0, "wire": "bytes", "bytes": "//4A"}, wire[5])

	// A miss prints no JSON.
	code, out, errOut := cli("show", "nope", "-json", "-db", db, "-scope", "public")
	assert.Equal(t, 1, code)
	assert.Empty(t, out)
	assert.Contains(t, errOut, `no record for key "nope" in scope "public"`)
}

// FuzzParseWire feeds the wire decoder of show arbitrary bytes: it must not
// panic, and what it decodes, encoded again (varints made minimal), must
// decode to the same fields.
func FuzzParseWire(f *testing.F) {
	f.Add([]byte("resp"))
	f.Add([]byte{0x0a, 0x02, 0x08, 0x01})
	f.Add([]byte{0x0b, 0x08, 0x01, 0x0c}) // a group
	f.Add([]byte{0x0c})                   // an end group alone
	f.Fuzz(func(t *testing.T, b []byte) {
		fields, ok := parseWire(b, 0)
		if ok {
			again, ok := parseWire(appendWire(nil, fields), 0)
			require.True(t, ok)
			require.Equal(t, fields, again)
		}
		var out bytes.Buffer
		printWire(&out, fields, "")
	})
}

// appendWire encodes fields back to wire bytes.
func appendWire(b []byte, fields []wireField) []byte {
	for _, f := range fields {
		switch f.Wire {
		case "varint":
			b = protowire.AppendVarint(protowire.AppendTag(b, f.Field, protowire.VarintType), *f.Value)
		case "fixed32":
			b = protowire.AppendFixed32(protowire.AppendTag(b, f.Field, protowire.Fixed32Type), uint32(*f.Value))
		case "fixed64":
			b = protowire.AppendFixed64(protowire.AppendTag(b, f.Field, protowire.Fixed64Type), *f.Value)
		case "group":
			b = protowire.AppendTag(appendWire(protowire.AppendTag(b, f.Field, protowire.StartGroupType), f.Message), f.Field, protowire.EndGroupType)
		case "bytes":
			var v []byte
			switch {
			case f.String != nil:
				v = []byte(*f.String)
			case f.Message != nil:
				v = appendWire(nil, f.Message)
			default:
				v = f.Bytes
			}
			b = protowire.AppendBytes(protowire.AppendTag(b, f.Field, protowire.BytesType), v)
		}
	}
	return b
}

// TestMissNamesOtherScopes checks that show and forget, finding no record
// for KEY in the scope given, name the scopes that hold KEY and the flag
// to rerun with (exit 1, and nothing deleted). Before, a miss in scope ""
// gave no hint that the payments example keeps its keys in "public".
func TestMissNamesOtherScopes(t *testing.T) {
	rec := okRecord("/payments.v1.PaymentService/Charge", []byte("r"))
	db := seedRecords(t, map[string]*idempotencyv1.Record{
		idempotency.StoreKey("public", "order-1"):   rec,
		idempotency.StoreKey("acme", "order-2"):     rec,
		idempotency.StoreKey("tenant b", "order-2"): rec,
		idempotency.StoreKey("", "order-3"):         rec,
	})
	for _, tc := range []struct {
		args []string
		want string // all of stderr
	}{
		{[]string{"show", "-db", db, "order-1"},
			`idempotency show: no record for key "order-1" in scope ""; found in scope "public": rerun with -scope public` + "\n"},
		{[]string{"show", "-db", db, "-json", "order-1"},
			`idempotency show: no record for key "order-1" in scope ""; found in scope "public": rerun with -scope public` + "\n"},
		{[]string{"forget", "-db", db, "order-1"},
			`idempotency forget: no record for key "order-1" in scope ""; found in scope "public": rerun with -scope public` + "\n"},
		{[]string{"show", "-db", db, "-scope", "public", "order-2"},
			`idempotency show: no record for key "order-2" in scope "public"; found in scopes "acme", "tenant b": rerun with -scope acme or -scope 'tenant b'` + "\n"},
		{[]string{"show", "-db", db, "-scope", "public", "order-3"},
			`idempotency show: no record for key "order-3" in scope "public"; found in scope "": rerun with -scope ''` + "\n"},
		{[]string{"forget", "-db", db, "-scope", "public", "nope"},
			`idempotency forget: no record for key "nope" in scope "public", nor in any other scope` + "\n"},
	} {
		code, out, errOut := cli(tc.args...)
		assert.Equal(t, 1, code, "%q", tc.args)
		assert.Empty(t, out, "%q", tc.args)
		assert.Equal(t, tc.want, errOut, "%q", tc.args)
	}
	// The hints work, and the misses deleted nothing.
	for _, args := range [][]string{
		{"show", "-db", db, "-scope", "public", "order-1"},
		{"show", "-db", db, "-scope", "tenant b", "order-2"},
		{"show", "-db", db, "-scope", "", "order-3"},
	} {
		code, _, errOut := cli(args...)
		assert.Equal(t, 0, code, "%q: %s", args, errOut)
	}
}

// TestOpenFailuresOneLine checks what every command says when it cannot use
// the file: held by a running server (another process), or damaged. Each
// prints one line that says what to do, exits 1, and never panics or spills
// bbolt's stack trace.
func TestOpenFailuresOneLine(t *testing.T) {
	argsFor := func(cmd, db string) []string {
		switch cmd {
		case "show", "forget":
			return []string{cmd, "order-1", "-db", db, "-scope", "public"}
		case "salvage":
			return []string{cmd, "-db", db, "-out", filepath.Join(t.TempDir(), "new.db")}
		}
		return []string{cmd, "-db", db}
	}
	oneLine := func(t *testing.T, args []string, code int, out, errOut string) {
		t.Helper()
		assert.Equal(t, 1, code, "%q", args)
		assert.Equal(t, 1, strings.Count(errOut, "\n"), "%q: one line: %s", args, errOut)
		assert.True(t, strings.HasPrefix(errOut, "idempotency "+args[0]+": "), "%q: %s", args, errOut)
		assert.NotContains(t, errOut, "usage:", "%q", args)
		assert.NotContains(t, errOut, "goroutine", "%q", args)
		assert.NotContains(t, out, "goroutine", "%q", args)
	}
	// bbolt's panics are logged through slog's default logger, which
	// writes to the process's stderr; catch anything logged.
	var logged bytes.Buffer
	prevLogger, prevOut, prevFlags := slog.Default(), log.Writer(), log.Flags()
	slog.SetDefault(slog.New(slog.NewTextHandler(&logged, nil)))
	t.Cleanup(func() {
		slog.SetDefault(prevLogger)
		log.SetOutput(prevOut)
		log.SetFlags(prevFlags)
	})

	t.Run("locked", func(t *testing.T) {
		db := seed(t)
		holdInAnotherProcess(t, db)
		for _, cmd := range []string{"list", "show", "forget", "sweep", "check", "salvage"} {
			args := argsFor(cmd, db)
			code, out, errOut := cli(args...)
			oneLine(t, args, code, out, errOut)
			assert.Contains(t, errOut, db+" is in use by another process, such as a running server", "%q", args)
			assert.Contains(t, errOut, "stop the server first", "%q", args)
		}
	})

	t.Run("not a bbolt file", func(t *testing.T) {
		db := filepath.Join(t.TempDir(), "idem.db")
		require.NoError(t, os.WriteFile(db, bytes.Repeat([]byte("not a bbolt file "), 1000), 0o600))
		for _, cmd := range []string{"list", "show", "forget", "sweep", "salvage"} {
			args := argsFor(cmd, db)
			code, out, errOut := cli(args...)
			oneLine(t, args, code, out, errOut)
			assert.Contains(t, errOut, "bbolt file is corrupt: "+db, "%q", args)
			if cmd != "salvage" {
				assert.Contains(t, errOut, "idempotency check -db "+db, "%q", args)
			}
		}
		code, out, _ := cli("check", "-db", db)
		assert.Equal(t, 1, code)
		assert.Contains(t, out, "DAMAGED")
	})

	t.Run("damaged page", func(t *testing.T) {
		db := seedMany(t, 300)
		_, lost := damagePage(t, db)
		_, onDamagedPage, _ := idempotency.SplitStoreKey(lost[0])
		for _, args := range [][]string{
			{"list", "-db", db},
			{"show", "-db", db, onDamagedPage},
			{"forget", "-db", db, onDamagedPage},
		} {
			code, out, errOut := cli(args...)
			oneLine(t, args, code, out, errOut)
			assert.Contains(t, errOut, "bbolt file is corrupt", "%q", args)
			assert.Contains(t, errOut, "idempotency salvage -db "+db, "%q", args)
		}
		// show and forget of a key whose page is sound still work; a miss
		// scans the file, meets the damaged page, and says so.
		code, _, errOut := cli("show", "-db", db, "order-0000")
		assert.Equal(t, 0, code, errOut)
		args := []string{"show", "-db", db, "-scope", "public", "order-0000"}
		code, out, errOut := cli(args...)
		oneLine(t, args, code, out, errOut)
		assert.Contains(t, errOut, `no record for key "order-0000" in scope "public"; looking for it in other scopes failed: bbolt file is corrupt`)
	})
	assert.Empty(t, logged.String(), "nothing logged")
}

// TestShowOmittedOutcome: a status-only record (its outcome was too large to
// store) says so in show and show -json.
func TestShowOmittedOutcome(t *testing.T) {
	path := filepath.Join(t.TempDir(), "idem.db")
	store, err := boltstore.Open(path)
	require.NoError(t, err)
	ctx := context.Background()
	key := idempotency.StoreKey("public", "big-1")
	_, err = store.Reserve(ctx, key, idempotency.Claim{Token: "t", Lease: time.Minute})
	require.NoError(t, err)
	rec, err := proto.Marshal(&idempotency.Record{
		Method: "/idempotency.testing.v1.PaymentService/Charge",
		Status: &spb.Status{Code: 0}, Omitted: "record of 5000000 bytes exceeds the limit of 4194304 (WithMaxRecordSize)",
	})
	require.NoError(t, err)
	require.NoError(t, store.Complete(ctx, key, "t", rec, time.Hour))
	require.NoError(t, store.Close())

	var out, errOut bytes.Buffer
	require.Equal(t, 0, run([]string{"show", "-db", path, "-scope", "public", "big-1"}, &out, &errOut), errOut.String())
	assert.Contains(t, out.String(), "omitted:     the outcome was too large to store (record of 5000000 bytes")
	out.Reset()
	require.Equal(t, 0, run([]string{"show", "-db", path, "-scope", "public", "-json", "big-1"}, &out, &errOut), errOut.String())
	assert.Contains(t, out.String(), `"omitted": "record of 5000000 bytes`)
}

// Offline, list can keep to one scope and a key prefix, and stats reads the
// file.
func TestListScopeAndStatsOffline(t *testing.T) {
	db := seed(t)
	code, out, errOut := cli("list", "-db", db, "-scope", "tenant/a", "-prefix", "order-")
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, `key="order-1"`)
	assert.NotContains(t, out, "bad-1")
	assert.Contains(t, out, "1 record\n")

	code, out, _ = cli("list", "-db", db, "-scope", "")
	require.Equal(t, 0, code)
	assert.Contains(t, out, `key="bad-1"`)
	assert.NotContains(t, out, "order-1")

	code, out, errOut = cli("stats", "-db", db)
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "store:    bbolt\nrecords:  2\nrunning:  0\n")
}
