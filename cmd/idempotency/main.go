// Command idempotency inspects and edits the records of a bbolt idempotency
// store: what a support engineer needs when a customer asks why a payment was
// (or was not) charged again.
//
//	idempotency list   -db FILE [-limit N]          one line per live record
//	idempotency show   -db FILE [-scope S] KEY      one record in full
//	idempotency forget -db FILE [-scope S] KEY      delete a record: the next call with KEY runs again
//	idempotency sweep  -db FILE                     delete expired records now
//	idempotency check  -db FILE                     check the file for damage (exit 1 if damaged)
//	idempotency salvage -db FILE -out NEW           copy the readable records of a damaged file to NEW
//
// A bbolt file serves one process: stop the server first, or work on a copy.
// docs/bbolt-recovery.md says how to recover a damaged file.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency"

	"github.com/grpcidem/idempotency/boltstore"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `usage:
  idempotency list   -db FILE [-limit N]       one line per live record
  idempotency show   -db FILE [-scope S] KEY   one record in full
  idempotency forget -db FILE [-scope S] KEY   delete a record: the next call with KEY runs again
  idempotency sweep  -db FILE                  delete expired records now
  idempotency check  -db FILE                  check the file for damage: bbolt's consistency check, and
                                               every record readable; exit 1 with a report if it is damaged
  idempotency salvage -db FILE -out NEW        copy every readable record of a damaged FILE into a new
                                               file NEW, skipping what cannot be read; FILE is not changed
A bbolt file serves one process: stop the server first, or work on a copy.
To recover a damaged file: check it, salvage it, then put NEW in its place
(see docs/bbolt-recovery.md).
`

// run is the command, with its exit code: 0, 1 for a failure, 2 for a usage
// error.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmd := args[0]
	fs := flag.NewFlagSet("idempotency "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	db := fs.String("db", "", "the bbolt file of the store (required)")
	scope := fs.String("scope", "", "the scope of KEY (show, forget)")
	limit := fs.Int("limit", 0, "list at most this many records (0: all)")
	outPath := fs.String("out", "", "the new file to write (salvage; it must not exist)")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	wantKey := cmd == "show" || cmd == "forget"
	switch {
	case cmd != "list" && cmd != "show" && cmd != "forget" && cmd != "sweep" && cmd != "check" && cmd != "salvage":
		fmt.Fprintf(stderr, "idempotency: unknown command %q\n%s", cmd, usage)
		return 2
	case *db == "":
		fmt.Fprintf(stderr, "idempotency %s: -db is required\n", cmd)
		return 2
	case wantKey && fs.NArg() != 1:
		fmt.Fprintf(stderr, "idempotency %s: give exactly one KEY\n", cmd)
		return 2
	case !wantKey && fs.NArg() != 0:
		fmt.Fprintf(stderr, "idempotency %s: unexpected arguments %q\n", cmd, fs.Args())
		return 2
	case (cmd == "salvage") != (*outPath != ""):
		fmt.Fprintf(stderr, "idempotency %s: -out is for salvage, and salvage requires it\n", cmd)
		return 2
	}
	if _, err := os.Stat(*db); err != nil {
		fmt.Fprintf(stderr, "idempotency %s: %v\n", cmd, err)
		return 1
	}
	switch cmd {
	case "check":
		return check(*db, stdout, stderr)
	case "salvage":
		return salvage(*db, *outPath, stdout, stderr)
	}
	store, err := boltstore.Open(*db, boltstore.WithLockTimeout(time.Second), boltstore.WithCacheRecords(0))
	if err != nil {
		fmt.Fprintf(stderr, "idempotency %s: %v\n", cmd, err)
		return 1
	}
	defer store.Close()
	if err := dispatch(store, cmd, *scope, fs.Arg(0), *limit, stdout); err != nil {
		fmt.Fprintf(stderr, "idempotency %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

func dispatch(store *boltstore.Store, cmd, scope, key string, limit int, out io.Writer) error {
	switch cmd {
	case "list":
		n := 0
		err := store.Records(func(storeKey string, e idempotency.Entry) bool {
			printLine(out, storeKey, e)
			n++
			return limit <= 0 || n < limit
		})
		if err == nil {
			fmt.Fprintf(out, "%d records\n", n)
		}
		return err
	case "show":
		e, err := store.Lookup(context.Background(), idempotency.StoreKey(scope, key))
		if err != nil {
			return err
		}
		if e.State != idempotency.Completed {
			return fmt.Errorf("no record for key %q in scope %q", key, scope)
		}
		return printRecord(out, scope, key, e)
	case "forget":
		found, err := store.Forget(idempotency.StoreKey(scope, key))
		if err != nil {
			return err
		}
		if !found {
			return fmt.Errorf("no record for key %q in scope %q", key, scope)
		}
		fmt.Fprintf(out, "forgot key %q in scope %q: the next call with it runs the handler again\n", key, scope)
		return nil
	case "sweep":
		n, err := store.Sweep()
		if err == nil {
			fmt.Fprintf(out, "swept %d expired records\n", n)
		}
		return err
	}
	return errors.New("unreachable")
}

func decode(e idempotency.Entry) (*idempotency.Record, error) {
	rec := new(idempotency.Record)
	if err := proto.Unmarshal(e.Record, rec); err != nil {
		return nil, fmt.Errorf("the stored record is corrupt: %w", err)
	}
	return rec, nil
}

func printLine(out io.Writer, storeKey string, e idempotency.Entry) {
	scope, key, _ := idempotency.SplitStoreKey(storeKey)
	rec, err := decode(e)
	if err != nil {
		fmt.Fprintf(out, "scope=%q key=%q  %v\n", scope, key, err)
		return
	}
	fmt.Fprintf(out, "scope=%q key=%q  %s  %s  responses=%d  created=%s  expires=%s\n",
		scope, key, rec.Method, codes.Code(rec.GetStatus().GetCode()), len(rec.Responses),
		rec.CreatedAt.AsTime().Format(time.RFC3339), e.Expires.UTC().Format(time.RFC3339))
}

func printRecord(out io.Writer, scope, key string, e idempotency.Entry) error {
	rec, err := decode(e)
	if err != nil {
		return err
	}
	st := rec.GetStatus()
	fmt.Fprintf(out, "scope:       %q\nkey:         %q\nmethod:      %s\n", scope, key, rec.Method)
	fmt.Fprintf(out, "status:      %s %q\n", codes.Code(st.GetCode()), st.GetMessage())
	for _, d := range st.GetDetails() {
		fmt.Fprintf(out, "  detail:    %s (%d bytes)\n", d.GetTypeUrl(), len(d.GetValue()))
	}
	fmt.Fprintf(out, "created:     %s\nexpires:     %s\nfingerprint: %x\n",
		rec.CreatedAt.AsTime().Format(time.RFC3339Nano), e.Expires.UTC().Format(time.RFC3339Nano), rec.Fingerprint)
	for _, md := range rec.Header {
		fmt.Fprintf(out, "header:      %s: %s\n", md.Key, values(md.Key, md.Values))
	}
	for _, md := range rec.Trailer {
		fmt.Fprintf(out, "trailer:     %s: %s\n", md.Key, values(md.Key, md.Values))
	}
	for i, r := range rec.Responses {
		fmt.Fprintf(out, "response %d:  %d bytes\n", i+1, len(r))
	}
	if rec.RequestsRead > 0 {
		fmt.Fprintf(out, "requests:    %d read, end of stream read: %v\n", rec.RequestsRead, rec.RequestsClosed)
	}
	return nil
}

func values(key string, vs [][]byte) string {
	parts := make([]string, len(vs))
	for i, v := range vs {
		if strings.HasSuffix(key, "-bin") {
			parts[i] = fmt.Sprintf("%x", v)
		} else {
			parts[i] = fmt.Sprintf("%q", v)
		}
	}
	return strings.Join(parts, ", ")
}

// check runs CheckBolt on the file at path and prints its report: exit 0 if
// the file is sound, 1 if it is damaged or could not be checked.
func check(path string, stdout, stderr io.Writer) int {
	r, err := boltstore.Check(path, boltstore.WithLockTimeout(time.Second))
	if err != nil {
		fmt.Fprintf(stderr, "idempotency check: %v\n", err)
		return 1
	}
	for _, n := range r.Notes {
		fmt.Fprintf(stdout, "note: %s\n", n)
	}
	if r.OK() {
		fmt.Fprintf(stdout, "%s: ok: %d records (%d expired); every page reads, and bbolt's consistency check passed\n", path, r.Records, r.Expired)
		return 0
	}
	fmt.Fprintf(stdout, "%s: DAMAGED: %d problems:\n", path, len(r.Problems))
	for _, p := range r.Problems {
		fmt.Fprintf(stdout, "  %s\n", p)
	}
	fmt.Fprintf(stdout, "%d readable records (%d expired)\n", r.Records, r.Expired)
	if !r.BboltChecked {
		fmt.Fprintln(stdout, "bbolt's own consistency check was not run: it would crash on pages that cannot be read")
	}
	fmt.Fprintf(stdout, "to recover, with the server stopped: idempotency salvage -db %s -out NEW, then put NEW in place of the file (see docs/bbolt-recovery.md)\n", path)
	return 1
}

// salvage runs SalvageBolt from src to the new file dst, prints what was
// copied and what was not, and checks dst.
func salvage(src, dst string, stdout, stderr io.Writer) int {
	r, err := boltstore.Salvage(src, dst)
	if err != nil {
		fmt.Fprintf(stderr, "idempotency salvage: %v\n", err)
		return 1
	}
	for _, p := range r.Problems {
		fmt.Fprintf(stdout, "  %s\n", p)
	}
	fmt.Fprintf(stdout, "copied %d records to %s; skipped %d unreadable records; %d unreadable pages of records lost; %d expired records left out\n",
		r.Copied, dst, r.Skipped, r.LostPages, r.Expired)
	if r.TreeLost {
		fmt.Fprintln(stdout, "the records' tree could not be reached: every record was looked for by scanning the file's pages")
	}
	if r.Scanned > 0 {
		fmt.Fprintf(stdout, "%d of the copied records were found by scanning the pages that the damaged tree no longer reaches\n", r.Scanned)
	}
	if r.FreedPagesScanned {
		fmt.Fprintln(stdout, "the freelist was lost, so pages bbolt had freed were scanned too: a record deleted with forget may be back; forget it again")
	}
	for _, k := range r.SkippedKeys {
		scope, key, _ := idempotency.SplitStoreKey(k)
		fmt.Fprintf(stdout, "skipped: scope=%q key=%q\n", scope, key)
	}
	if r.Skipped > 0 || r.LostPages > 0 {
		fmt.Fprintln(stdout, "the keys of skipped and lost records run the handler again on their next call")
	}
	c, err := boltstore.Check(dst)
	if err != nil || !c.OK() {
		fmt.Fprintf(stderr, "idempotency salvage: the new file %s does not pass the check: %v %q\n", dst, err, c.Problems)
		return 1
	}
	fmt.Fprintf(stdout, "%s passes the check; with the server stopped, move %s aside and put %s in its place\n", dst, src, dst)
	return 0
}
