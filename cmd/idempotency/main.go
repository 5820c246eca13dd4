// Command idempotency inspects and edits the records of an idempotency store:
// what a support engineer needs when a customer asks why a payment was (or
// was not) charged again. It works on the bbolt file of a stopped server
// (-db FILE), or talks to the admin service (idempotency.v1.Admin) of a
// running server, whatever its store (-addr HOST:PORT).
//
//	idempotency list    -db FILE|-addr HOST:PORT [-scope SCOPE [-prefix PREFIX]] [-limit N]
//	                                                         one line per live record
//	idempotency show    -db FILE|-addr HOST:PORT [-scope SCOPE] [-json] KEY
//	                                                         one record in full
//	idempotency forget  -db FILE|-addr HOST:PORT [-scope SCOPE] [-force] KEY
//	                                                         delete a record: the next call with KEY runs again
//	idempotency stats   -db FILE|-addr HOST:PORT             what the store holds
//	idempotency sweep   -db FILE                             delete expired records now
//	idempotency check   -db FILE                             check the file for damage (exit 1 if damaged)
//	idempotency salvage -db FILE -out NEW                    copy the readable records of a damaged file to NEW
//	idempotency help    [COMMAND]                            this, or one command in full
//
// Flags may come anywhere on the command line, before or after KEY. Against
// the file of the payments example's server, whose scope is its tenant
// ("public" unless the client sends x-tenant):
//
//	idempotency list -db payments-idem.db
//	idempotency show -db payments-idem.db -scope public order-1001
//	idempotency forget -addr 127.0.0.1:8081 -scope public order-1001
//
// With -addr, the bearer token for the admin service comes from -token or
// $IDEMPOTENCY_ADMIN_TOKEN; a loopback address is reached without TLS,
// another with TLS unless -insecure is given.
//
// Exit status: 0 on success, 1 when the command failed (no such record, a
// damaged or busy file, a server that refused or could not be reached), 2
// for a usage error.
//
// A bbolt file serves one process: stop the server first, or work on a copy,
// or use -addr. docs/bbolt-recovery.md says how to recover a damaged file;
// docs/admin.md describes the admin service.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"strconv"
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

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1 // the command ran and failed
	exitUsage   = 2 // the command line is wrong
)

// options are the values of every command's flags, and its KEY.
type options struct {
	db, scope, out string
	limit          int
	json           bool
	key            string
	// For a running server's admin service.
	addr, token     string
	insecure, force bool
	prefix          string
	scopeSet        bool // -scope was given (list: one scope, not all)
}

// flagDefs defines each flag on a flag set; a command has the ones it names.
var flagDefs = map[string]func(fs *flag.FlagSet, o *options){
	"db": func(fs *flag.FlagSet, o *options) {
		fs.StringVar(&o.db, "db", "", "the store's bbolt `FILE` (required, or -addr where a command takes it), such as the payments example's payments-idem.db")
	},
	"scope": func(fs *flag.FlagSet, o *options) {
		fs.StringVar(&o.scope, "scope", "", "the `SCOPE` of KEY: the one the server's WithScope gave the call (the payments example: its tenant, \"public\" by default)")
	},
	"limit": func(fs *flag.FlagSet, o *options) {
		fs.IntVar(&o.limit, "limit", 0, "print at most `N` records (0: all); the summary still counts them all")
	},
	"out": func(fs *flag.FlagSet, o *options) {
		fs.StringVar(&o.out, "out", "", "the `NEW` file to write (required; it must not exist)")
	},
	"json": func(fs *flag.FlagSet, o *options) {
		fs.BoolVar(&o.json, "json", false, "print the record as one JSON object, for scripts")
	},
	"addr": func(fs *flag.FlagSet, o *options) {
		fs.StringVar(&o.addr, "addr", "", "talk to the admin service of a running server at `HOST:PORT` instead of opening a file (the payments example: its -admin address)")
	},
	"token": func(fs *flag.FlagSet, o *options) {
		fs.StringVar(&o.token, "token", "", "with -addr: send `TOKEN` as \"authorization: Bearer TOKEN\" (default: $"+tokenEnv+")")
	},
	"insecure": func(fs *flag.FlagSet, o *options) {
		fs.BoolVar(&o.insecure, "insecure", false, "with -addr: connect without TLS, also to an address that is not loopback (loopback addresses never use TLS)")
	},
	"force": func(fs *flag.FlagSet, o *options) {
		fs.BoolVar(&o.force, "force", false, "forget KEY also while its first execution runs: its lease ends, and the next call runs beside it")
	},
	"prefix": func(fs *flag.FlagSet, o *options) {
		fs.StringVar(&o.prefix, "prefix", "", "with -scope: only keys that start with `PREFIX`")
	},
}

// onlineFlags are the flags of a command that can talk to a running server.
var onlineFlags = []string{"addr", "token", "insecure"}

// command is one of the tool's commands.
type command struct {
	name     string
	flags    []string // names in flagDefs
	key      bool     // takes one KEY
	writes   bool     // changes the file
	synopsis string   // its arguments, for usage lines
	short    string   // one line, for the list of commands
	long     string   // what `help NAME` adds
	examples []string // command lines against the payments example's file
}

var commands = []*command{{
	name: "list", flags: append([]string{"db", "scope", "prefix", "limit"}, onlineFlags...),
	synopsis: "-db FILE|-addr HOST:PORT [-scope SCOPE [-prefix PREFIX]] [-limit N]",
	short:    "one line per live record",
	long: `List prints one line per live (unexpired) record, in store-key order: its
scope, key, method, status code, number of responses, and when it was created
and expires; then how many live records the file holds: all of them are
counted, also when -limit prints fewer ("3 of 11 records shown"). With
-scope, only the records of that scope, and with -prefix only those whose
key starts with PREFIX.

With -addr, list asks a running server's admin service, whatever its store,
and also lists the keys whose first execution is running ("running", with
their owner and when their lease ends). It stops after -limit keys and then
says whether more remain. A Redis store lists in its own order.`,
	examples: []string{
		"idempotency list -db payments-idem.db -limit 20",
		"idempotency list -addr 127.0.0.1:8081 -scope public -prefix order-",
	},
}, {
	name: "show", flags: append([]string{"db", "scope", "json"}, onlineFlags...), key: true,
	synopsis: "-db FILE|-addr HOST:PORT [-scope SCOPE] [-json] KEY",
	short:    "one record in full",
	long: `Show prints the record stored for KEY in SCOPE: its method, status (code,
message and details), header and trailer metadata, when it was created and
expires, the fingerprint of its requests, and every stored response.

A response (or a status detail) whose message type is linked into this tool
is printed as protojson; any other is printed as its wire fields, one a line:
field number, wire type and value, with text quoted and bytes that parse as
a message decoded as one, indented. -bin metadata values are base64, as gRPC
sends them. With -json, show prints the whole record as one JSON object:
scope, key, method, status {code, codeName, message, details}, header and
trailer (key: [values]), responses [{type, size, message | wire, bytes}],
createdAt, expiresAt, fingerprint (hex).

If KEY has no record in SCOPE, show looks for it under the file's other
scopes and says which -scope to rerun with (exit 1).

With -addr, show asks a running server's admin service; a key whose first
execution is running is shown with its owner, when its lease ends and its
request's fingerprint (with -json: state "pending").`,
	examples: []string{
		"idempotency show -db payments-idem.db -scope public order-1001",
		"idempotency show -addr 127.0.0.1:8081 -scope public order-1001",
		"idempotency show order-1001 -db payments-idem.db -scope public -json",
	},
}, {
	name: "forget", flags: append([]string{"db", "scope", "force"}, onlineFlags...), key: true, writes: true,
	synopsis: "-db FILE|-addr HOST:PORT [-scope SCOPE] [-force] KEY",
	short:    "delete a record: the next call with KEY runs again",
	long: `Forget deletes the record stored for KEY in SCOPE, so that the next call with
KEY runs the handler again instead of replaying the record. Use it when the
stored outcome was undone by hand (a refund, say). If KEY has no record in
SCOPE, forget deletes nothing, and names the scopes that hold KEY (exit 1).

With -addr, forget asks a running server's admin service, so the server
need not stop. A key whose first execution is still running is refused
(exit 1) unless -force is given: then its lease ends at once and the next
call with KEY runs beside the one still running; use it only for an owner
known to be gone.`,
	examples: []string{
		"idempotency forget -db payments-idem.db -scope public order-1001",
		"idempotency forget -addr 127.0.0.1:8081 -scope public order-1001",
	},
}, {
	name: "stats", flags: append([]string{"db"}, onlineFlags...),
	synopsis: "-db FILE|-addr HOST:PORT",
	short:    "what the store holds: records, running keys, bytes",
	long: `Stats prints what the store holds, as far as it can tell cheaply: the kind of
store, how many records and running keys, how many bytes they take, and
figures particular to the store. A figure the store cannot tell cheaply
(Redis counts no records without scanning them) is "unknown".`,
	examples: []string{
		"idempotency stats -db payments-idem.db",
		"idempotency stats -addr 127.0.0.1:8081",
	},
}, {
	name: "sweep", flags: []string{"db"}, writes: true,
	synopsis: "-db FILE",
	short:    "delete expired records now",
	long: `Sweep deletes the expired records now, instead of waiting for the server's
sweeper, and says how many it deleted.`,
	examples: []string{"idempotency sweep -db payments-idem.db"},
}, {
	name: "check", flags: []string{"db"},
	synopsis: "-db FILE",
	short:    "check the file for damage (exit 1 if damaged)",
	long: `Check reads every page of the file, runs bbolt's consistency check when the
pages all read well, and checks that every record is readable. It exits 1
with a report when the file is damaged, and never changes it.`,
	examples: []string{"idempotency check -db payments-idem.db"},
}, {
	name: "salvage", flags: []string{"db", "out"},
	synopsis: "-db FILE -out NEW",
	short:    "copy the readable records of a damaged FILE to a new file NEW",
	long: `Salvage copies every readable record of a damaged FILE into the new file NEW,
skipping what cannot be read, and says what it could not copy; FILE is not
changed. With the server stopped, put NEW in place of FILE.`,
	examples: []string{"idempotency salvage -db payments-idem.db -out payments-idem.salvaged.db"},
}}

// has reports whether c takes the flag name.
func (c *command) has(name string) bool {
	for _, f := range c.flags {
		if f == name {
			return true
		}
	}
	return false
}

func lookup(name string) *command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	return nil
}

func (c *command) usageLine() string {
	return "usage: idempotency " + c.name + " " + c.synopsis + "\n"
}

// usage is the tool's usage: its commands, and examples against the
// payments example's file.
func usage() string {
	var b strings.Builder
	b.WriteString("usage: idempotency COMMAND [flags] [KEY]\n\ncommands:\n")
	for _, c := range commands {
		fmt.Fprintf(&b, "  %-8s %s\n  %-8s   %s\n", c.name, c.synopsis, "", c.short)
	}
	fmt.Fprintf(&b, "  %-8s %s\n  %-8s   %s\n", "help", "[COMMAND]", "", "this, or one command in full")
	b.WriteString(`
Flags may come anywhere on the command line, before or after KEY.
Exit status: 0 on success, 1 when the command fails, 2 for a usage error.

Examples, against the file of the payments example's server (its scope is the
caller's tenant: "public" unless the client sends x-tenant):
  idempotency list -db payments-idem.db
  idempotency show -db payments-idem.db -scope public order-1001
  idempotency forget -db payments-idem.db -scope public order-1001
and against the admin service of the running server (its -admin address):
  idempotency forget -addr 127.0.0.1:8081 -scope public order-1001

With -addr, the bearer token comes from -token or $IDEMPOTENCY_ADMIN_TOKEN;
loopback addresses are reached without TLS, others with TLS unless -insecure.
A bbolt file serves one process: stop the server first, or work on a copy,
or use -addr.
To recover a damaged file: check it, salvage it, then put NEW in its place
(see docs/bbolt-recovery.md). Run 'idempotency help COMMAND' for more.
`)
	return b.String()
}

// help prints the full help of c to w.
func (c *command) help(w io.Writer) {
	flags, _ := c.flagSet()
	var defaults bytes.Buffer
	flags.SetOutput(&defaults)
	flags.PrintDefaults()
	fmt.Fprintf(w, "%s\n%s\n\nflags (anywhere on the command line, before or after KEY):\n%s\nexamples:\n", c.usageLine(), c.long, defaults.String())
	for _, e := range c.examples {
		fmt.Fprintf(w, "  %s\n", e)
	}
}

// flagSet returns a flag set with c's flags, which set the returned options.
// It prints nothing: run reports errors and help itself.
func (c *command) flagSet() (*flag.FlagSet, *options) {
	o := new(options)
	fs := flag.NewFlagSet("idempotency "+c.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	for _, name := range c.flags {
		flagDefs[name](fs, o)
	}
	return fs, o
}

// parseInterspersed parses args with fs, flags and positional arguments in
// any order (the flag package alone stops at the first positional
// argument), and returns the positional ones. Everything after a "--" that
// ends the flags is positional.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, nil
		}
		if endsWithTerminator(fs, args[:len(args)-len(rest)]) {
			return append(positional, rest...), nil
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}

// endsWithTerminator reports whether the flags fs parsed, consumed, ended
// with a "--" that ends the flags (rather than a flag's value "--").
func endsWithTerminator(fs *flag.FlagSet, consumed []string) bool {
	if len(consumed) == 0 || consumed[len(consumed)-1] != "--" {
		return false
	}
	for i := 0; i < len(consumed); i++ {
		if consumed[i] == "--" {
			return i == len(consumed)-1
		}
		if takesValue(fs, consumed[i]) {
			i++
		}
	}
	return false
}

// takesValue reports whether arg is a flag of fs whose value is the next
// argument: not a boolean flag, and not written -name=value.
func takesValue(fs *flag.FlagSet, arg string) bool {
	if !strings.HasPrefix(arg, "-") {
		return false
	}
	name := strings.TrimPrefix(strings.TrimPrefix(arg, "-"), "-")
	if strings.Contains(name, "=") {
		return false
	}
	f := fs.Lookup(name)
	if f == nil {
		return false
	}
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return !ok || !b.IsBoolFlag()
}

// commandIndex returns the index in args of the command's name: the first
// argument that is not a flag or a flag's value, so that flags may come
// before the command too. It returns -1 if there is none.
func commandIndex(args []string) int {
	all := flag.NewFlagSet("idempotency", flag.ContinueOnError)
	var o options
	for _, def := range flagDefs {
		def(all, &o)
	}
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--":
			if i+1 < len(args) {
				return i + 1
			}
			return -1
		case a == "-" || !strings.HasPrefix(a, "-"):
			return i
		case takesValue(all, a):
			i++
		}
	}
	return -1
}

// run is the command, with its exit code: 0, 1 for a failure, 2 for a usage
// error. Help asked for goes to stdout; usage errors go to stderr.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage())
		return exitUsage
	}
	switch args[0] {
	case "-h", "-help", "--help":
		fmt.Fprint(stdout, usage())
		return exitOK
	case "help":
		return help(args[1:], stdout, stderr)
	}
	i := commandIndex(args)
	if i < 0 {
		// Only flags: -h among them asks for help; anything else lacks a command.
		for _, a := range args {
			if a == "-h" || a == "-help" || a == "--help" {
				fmt.Fprint(stdout, usage())
				return exitOK
			}
		}
		fmt.Fprintf(stderr, "idempotency: no command given\n\n%s", usage())
		return exitUsage
	}
	name := args[i]
	cmd := lookup(name)
	if cmd == nil {
		fmt.Fprintf(stderr, "idempotency: unknown command %q\n\n%s", name, usage())
		return exitUsage
	}
	rest := append(append([]string(nil), args[:i]...), args[i+1:]...)
	flags, o := cmd.flagSet()
	positional, err := parseInterspersed(flags, rest)
	flags.Visit(func(f *flag.Flag) { o.scopeSet = o.scopeSet || f.Name == "scope" })
	switch {
	case errors.Is(err, flag.ErrHelp):
		cmd.help(stdout)
		return exitOK
	case err != nil:
		return cmd.usageError(stderr, "%v", err)
	case o.db != "" && o.addr != "":
		return cmd.usageError(stderr, "give -db FILE (a stopped server's bbolt file) or -addr HOST:PORT (a running server), not both")
	case o.db == "" && o.addr == "" && cmd.has("addr"):
		return cmd.usageError(stderr, "-db is required: the store's bbolt file, such as -db payments-idem.db; or -addr HOST:PORT for a running server's admin service")
	case o.db == "" && o.addr == "":
		return cmd.usageError(stderr, "-db is required: the store's bbolt file, such as -db payments-idem.db")
	case o.addr == "" && (o.token != "" || o.insecure):
		return cmd.usageError(stderr, "-token and -insecure go with -addr HOST:PORT")
	case o.prefix != "" && !o.scopeSet:
		return cmd.usageError(stderr, "-prefix PREFIX needs -scope SCOPE: keys are listed within a scope (-scope '' for the empty one)")
	case cmd.key && len(positional) != 1:
		return cmd.usageError(stderr, "give exactly one KEY (got %d arguments: %q)", len(positional), positional)
	case !cmd.key && len(positional) != 0:
		return cmd.usageError(stderr, "unexpected arguments %q", positional)
	case cmd.name == "salvage" && o.out == "":
		return cmd.usageError(stderr, "-out NEW is required: the new file to copy the readable records to")
	case o.limit < 0:
		return cmd.usageError(stderr, "-limit is %d; give 0 (all) or more", o.limit)
	}
	if cmd.key {
		o.key = positional[0]
	}
	if o.addr != "" {
		return remote(cmd, o, stdout, stderr)
	}
	if _, err := os.Stat(o.db); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return cmd.fail(stderr, "no such file: %s (give -db the file the server writes, such as payments-idem.db; this tool does not create one)", o.db)
		}
		return cmd.failOn(stderr, o.db, err)
	}
	switch cmd.name {
	case "check":
		return check(cmd, o.db, stdout, stderr)
	case "salvage":
		return salvage(cmd, o.db, o.out, stdout, stderr)
	}
	store, err := boltstore.Open(o.db, boltstore.WithLockTimeout(time.Second), boltstore.WithCacheRecords(0),
		// The errors say what went wrong, on one line; a stack trace of
		// bbolt's panic on a damaged page is not for operators.
		boltstore.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		return cmd.failOn(stderr, o.db, err)
	}
	defer store.Close()
	if err := dispatch(store, cmd.name, o, stdout); err != nil {
		return cmd.failOn(stderr, o.db, err)
	}
	return exitOK
}

// help is the help command: the tool's usage, or one command's help.
func help(args []string, stdout, stderr io.Writer) int {
	switch {
	case len(args) == 0:
		fmt.Fprint(stdout, usage())
		return exitOK
	case len(args) > 1:
		fmt.Fprintf(stderr, "idempotency help: give one command, not %q\n\n%s", args, usage())
		return exitUsage
	}
	cmd := lookup(args[0])
	if cmd == nil {
		fmt.Fprintf(stderr, "idempotency help: unknown command %q\n\n%s", args[0], usage())
		return exitUsage
	}
	cmd.help(stdout)
	return exitOK
}

// usageError reports a usage error of c on stderr, with c's usage line.
func (c *command) usageError(stderr io.Writer, format string, args ...any) int {
	fmt.Fprintf(stderr, "idempotency %s: %s\n%sRun 'idempotency help %s' for details.\n",
		c.name, fmt.Sprintf(format, args...), c.usageLine(), c.name)
	return exitUsage
}

// fail reports a failure of c on stderr, on one line.
func (c *command) fail(stderr io.Writer, format string, args ...any) int {
	msg := strings.ReplaceAll(fmt.Sprintf(format, args...), "\n", " ")
	fmt.Fprintf(stderr, "idempotency %s: %s\n", c.name, msg)
	return exitFailure
}

// failOn reports err, met by c working on the bbolt file at path, on one
// line that says what to do: for a file a server holds, to stop it; for a
// damaged file, how to check and salvage it (the store's error says how).
func (c *command) failOn(stderr io.Writer, path string, err error) int {
	if errors.Is(err, boltstore.ErrLocked) {
		advice := "stop the server first, or work on a copy of the file"
		if c.writes {
			advice = "stop the server first: " + c.name + " changes the file, so it must have it to itself"
		}
		return c.fail(stderr, "%s is in use by another process, such as a running server (a bbolt file serves one process at a time): %s", path, advice)
	}
	// The store's errors start with its package's name; this line starts
	// with the command's.
	msg := strings.ReplaceAll(err.Error(), ": idempotency: ", ": ")
	return c.fail(stderr, "%s", strings.TrimPrefix(msg, "idempotency: "))
}

func dispatch(store *boltstore.Store, cmd string, o *options, out io.Writer) error {
	scope, key, limit := o.scope, o.key, o.limit
	switch cmd {
	case "list":
		// Every record is counted, so that the summary says how many -limit
		// left out: the scan is cheap next to what an operator waits for.
		shown, total := 0, 0
		err := store.Records(func(storeKey string, e idempotency.Entry) bool {
			if o.scopeSet && !strings.HasPrefix(storeKey, idempotency.StoreKey(scope, o.prefix)) {
				return true
			}
			total++
			if limit <= 0 || shown < limit {
				printLine(out, storeKey, e)
				shown++
			}
			return true
		})
		if err != nil {
			return err
		}
		if shown < total {
			fmt.Fprintf(out, "%d of %s shown (-limit %d; -limit 0 shows all)\n", shown, plural(total, "record"), limit)
		} else {
			fmt.Fprintln(out, plural(total, "record"))
		}
		return nil
	case "show":
		e, err := store.Lookup(context.Background(), idempotency.StoreKey(scope, key))
		if err != nil {
			return err
		}
		if e.State != idempotency.Completed {
			return missing(store, scope, key)
		}
		return printRecord(out, scope, key, e, o.json)
	case "forget":
		e, err := store.ForgetKey(context.Background(), idempotency.StoreKey(scope, key), o.force)
		if err != nil {
			return err
		}
		if e.State == idempotency.Absent {
			return missing(store, scope, key)
		}
		fmt.Fprintf(out, "forgot key %q in scope %q: the next call with it runs the handler again\n", key, scope)
		return nil
	case "stats":
		sum, err := store.Summary(context.Background())
		if err != nil {
			return err
		}
		printStats(out, statsOf(sum))
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

// missing is the error for a key that has no record in scope. A scope is
// easy to get wrong (the server's WithScope chose it, not the caller), so
// it scans the file for the key under other scopes, and says which to rerun
// with.
func missing(store *boltstore.Store, scope, key string) error {
	var scopes []string
	err := store.Records(func(storeKey string, _ idempotency.Entry) bool {
		if s, k, ok := idempotency.SplitStoreKey(storeKey); ok && k == key && s != scope {
			scopes = append(scopes, s)
		}
		return true
	})
	msg := fmt.Sprintf("no record for key %q in scope %q", key, scope)
	if err != nil {
		return fmt.Errorf("%s; looking for it in other scopes failed: %w", msg, err)
	}
	switch len(scopes) {
	case 0:
		return errors.New(msg + ", nor in any other scope")
	case 1:
		return fmt.Errorf("%s; found in scope %q: rerun with -scope %s", msg, scopes[0], shellQuote(scopes[0]))
	}
	quoted := make([]string, len(scopes))
	flags := make([]string, len(scopes))
	for i, s := range scopes {
		quoted[i] = strconv.Quote(s)
		flags[i] = "-scope " + shellQuote(s)
	}
	return fmt.Errorf("%s; found in scopes %s: rerun with %s", msg, strings.Join(quoted, ", "), strings.Join(flags, " or "))
}

// shellQuote quotes s for a POSIX shell, if it needs quoting.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.,:/@%+=") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
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

// check runs boltstore.Check on the file at path and prints its report: exit 0 if
// the file is sound, 1 if it is damaged or could not be checked.
func check(c *command, path string, stdout, stderr io.Writer) int {
	r, err := boltstore.Check(path, boltstore.WithLockTimeout(time.Second))
	if err != nil {
		return c.failOn(stderr, path, err)
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

// salvage runs boltstore.Salvage from src to the new file dst, prints what was
// copied and what was not, and checks dst.
func salvage(cmd *command, src, dst string, stdout, stderr io.Writer) int {
	r, err := boltstore.Salvage(src, dst)
	if err != nil {
		return cmd.failOn(stderr, src, err)
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
