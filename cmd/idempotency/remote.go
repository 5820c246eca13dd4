package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// tokenEnv holds the admin service's bearer token when -token is not given,
// so that it need not appear on a command line.
const tokenEnv = "IDEMPOTENCY_ADMIN_TOKEN"

// remoteTimeout bounds one command against a running server.
const remoteTimeout = 30 * time.Second

// remote runs cmd against the admin service at o.addr.
func remote(cmd *command, o *options, stdout, stderr io.Writer) int {
	host, _, err := net.SplitHostPort(o.addr)
	if err != nil {
		return cmd.usageError(stderr, "-addr %q: %v; give HOST:PORT, such as -addr 127.0.0.1:8081", o.addr, err)
	}
	if o.token == "" {
		o.token = os.Getenv(tokenEnv)
	}
	creds := insecure.NewCredentials()
	if !o.insecure && !loopback(host) {
		creds = credentials.NewTLS(&tls.Config{ServerName: host, MinVersion: tls.VersionTLS12})
	}
	conn, err := grpc.NewClient(o.addr, grpc.WithTransportCredentials(creds),
		// A record may be as large as the server's WithMaxRecordSize.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20)))
	if err != nil {
		return cmd.fail(stderr, "%s: %v", o.addr, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), remoteTimeout)
	defer cancel()
	if o.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+o.token)
	}
	client := idempotencyv1.NewAdminClient(conn)
	switch cmd.name {
	case "list":
		err = remoteList(ctx, client, o, stdout)
	case "show":
		err = remoteShow(ctx, client, o, stdout)
	case "forget":
		err = remoteForget(ctx, client, o, stdout)
	case "stats":
		var resp *idempotencyv1.StatsResponse
		if resp, err = client.Stats(ctx, &idempotencyv1.StatsRequest{}); err == nil {
			printStats(stdout, resp)
		}
	}
	if err != nil {
		return cmd.fail(stderr, "%s", remoteError(o, err))
	}
	return exitOK
}

func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// remoteError says what a failed call means, and what to do about it.
func remoteError(o *options, err error) string {
	st := status.Convert(err)
	msg := st.Message()
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded:
		return fmt.Sprintf("%s: %s (%s); is it the admin listener of a running server (the payments example's -admin address)? A server that is not on loopback may need -insecure, or TLS", o.addr, msg, st.Code())
	case codes.Unauthenticated, codes.PermissionDenied:
		return fmt.Sprintf("%s refused the call: %s (%s); pass the admin token with -token or $%s", o.addr, msg, st.Code(), tokenEnv)
	case codes.NotFound:
		return fmt.Sprintf("%s; 'list -addr %s' shows the keys of every scope", msg, o.addr)
	case codes.Unimplemented:
		return fmt.Sprintf("%s: %s; the server does not serve idempotency.v1.Admin on this address", o.addr, msg)
	}
	return fmt.Sprintf("%s (%s)", msg, st.Code())
}

func remoteList(ctx context.Context, c idempotencyv1.AdminClient, o *options, out io.Writer) error {
	req := &idempotencyv1.ListRecordsRequest{AllScopes: !o.scopeSet}
	if o.scopeSet {
		req.Scope, req.KeyPrefix = []byte(o.scope), []byte(o.prefix)
	}
	// A Redis store may list a key twice: it is printed once.
	seen := map[string]bool{}
	records, running := 0, 0
	more := false
	for {
		size := idempotency.MaxAdminPageSize
		if o.limit > 0 {
			size = min(size, o.limit-records-running)
		}
		req.PageSize = int32(size)
		resp, err := c.ListRecords(ctx, req)
		if err != nil {
			return err
		}
		for _, r := range resp.GetRecords() {
			if seen[string(r.GetStoreKey())] {
				continue
			}
			seen[string(r.GetStoreKey())] = true
			if printSummary(out, r) {
				running++
			} else {
				records++
			}
		}
		req.PageToken = resp.GetNextPageToken()
		if req.PageToken == "" {
			break
		}
		if o.limit > 0 && records+running >= o.limit {
			more = true
			break
		}
	}
	summary := plural(records, "record")
	if running > 0 {
		summary += fmt.Sprintf(", %d running", running)
	}
	if more {
		summary += fmt.Sprintf(" shown; more remain (-limit %d; -limit 0 shows all)", o.limit)
	}
	fmt.Fprintln(out, summary)
	return nil
}

// printSummary prints one listed key, in list's format, and reports whether
// it is running.
func printSummary(out io.Writer, r *idempotencyv1.RecordSummary) bool {
	name := fmt.Sprintf("scope=%q key=%q", r.GetScope(), r.GetKey())
	if len(r.GetKey()) == 0 {
		name = fmt.Sprintf("store-key=%q", r.GetStoreKey())
	}
	expires := r.GetExpiresAt().AsTime().UTC().Format(time.RFC3339)
	if r.GetState() == idempotencyv1.RecordState_RECORD_STATE_PENDING {
		fmt.Fprintf(out, "%s  running  owner=%s  lease-until=%s\n", name, r.GetOwnerToken(), expires)
		return true
	}
	fmt.Fprintf(out, "%s  %s  %s  responses=%d  created=%s  expires=%s\n",
		name, r.GetMethod(), codes.Code(r.GetCode()), r.GetResponseCount(),
		r.GetCreatedAt().AsTime().Format(time.RFC3339), expires)
	return false
}

func remoteShow(ctx context.Context, c idempotencyv1.AdminClient, o *options, out io.Writer) error {
	resp, err := c.GetRecord(ctx, &idempotencyv1.GetRecordRequest{Scope: []byte(o.scope), Key: []byte(o.key)})
	if err != nil {
		return err
	}
	if resp.GetState() == idempotencyv1.RecordState_RECORD_STATE_PENDING {
		lease := resp.GetLeaseExpiresAt().AsTime().UTC().Format(time.RFC3339Nano)
		if o.json {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			return enc.Encode(map[string]string{
				"scope": o.scope, "key": o.key, "state": "pending",
				"owner": resp.GetOwnerToken(), "leaseExpiresAt": lease,
				"fingerprint": fmt.Sprintf("%x", resp.GetFingerprint()),
			})
		}
		fmt.Fprintf(out, "scope:       %q\nkey:         %q\nstate:       running: its first execution has not finished\n", o.scope, o.key)
		fmt.Fprintf(out, "owner:       %s\nlease until: %s\nfingerprint: %x\n", resp.GetOwnerToken(), lease, resp.GetFingerprint())
		return nil
	}
	raw, err := proto.Marshal(resp.GetRecord())
	if err != nil {
		return err
	}
	e := idempotency.Entry{State: idempotency.Completed, Record: raw, Expires: resp.GetExpiresAt().AsTime()}
	return printRecord(out, o.scope, o.key, e, o.json)
}

func remoteForget(ctx context.Context, c idempotencyv1.AdminClient, o *options, out io.Writer) error {
	resp, err := c.ForgetRecord(ctx, &idempotencyv1.ForgetRecordRequest{Scope: []byte(o.scope), Key: []byte(o.key), Force: o.force})
	if err != nil {
		return err
	}
	if resp.GetState() == idempotencyv1.RecordState_RECORD_STATE_PENDING {
		fmt.Fprintf(out, "forgot running key %q in scope %q: its lease ended; the next call with it runs the handler again, beside the one still running\n", o.key, o.scope)
		return nil
	}
	fmt.Fprintf(out, "forgot key %q in scope %q: the next call with it runs the handler again\n", o.key, o.scope)
	return nil
}

// statsOf is a store's summary as the admin service reports it.
func statsOf(s idempotency.StoreSummary) *idempotencyv1.StatsResponse {
	known := func(n int64) *int64 {
		if n < 0 {
			return nil
		}
		return &n
	}
	return &idempotencyv1.StatsResponse{Store: s.Store, Records: known(s.Records), Pending: known(s.Pending),
		Bytes: known(s.Bytes), Approximate: s.Approximate, Extra: s.Extra}
}

func printStats(out io.Writer, s *idempotencyv1.StatsResponse) {
	figure := func(n *int64) string {
		if n == nil {
			return "unknown"
		}
		return fmt.Sprint(*n)
	}
	fmt.Fprintf(out, "store:    %s\n", s.GetStore())
	fmt.Fprintf(out, "records:  %s\nrunning:  %s\nbytes:    %s\n", figure(s.Records), figure(s.Pending), figure(s.Bytes))
	if s.GetApproximate() {
		fmt.Fprintln(out, "(estimates, or counting expired records not yet swept)")
	}
	names := make([]string, 0, len(s.GetExtra()))
	for k := range s.GetExtra() {
		names = append(names, k)
	}
	slices.Sort(names)
	for _, k := range names {
		fmt.Fprintf(out, "%s: %d\n", strings.ReplaceAll(k, "_", " "), s.GetExtra()[k])
	}
}
