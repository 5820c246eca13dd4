package pgstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// The loopback ports of the failover tests' own clusters: a primary and its
// standby, started and stopped by each test.
const (
	primaryPort = 15432
	standbyPort = 15433
)

// failoverDSN reaches whichever of the two servers takes writes: pgx tries
// the hosts in order and keeps the first that is not read-only.
var failoverDSN = fmt.Sprintf("postgres://postgres@127.0.0.1:%d,127.0.0.1:%d/test?target_session_attrs=read-write&sslmode=disable&connect_timeout=5",
	primaryPort, standbyPort)

// pgPair is a primary and a streaming standby made from it with
// pg_basebackup, each its own PostgreSQL cluster (data directory and server
// process) on a loopback port, under one directory of /tmp.
type pgPair struct {
	t        testing.TB
	bin      string // the PostgreSQL binaries
	dir      string
	asUser   []string // the command prefix that runs a program as the postgres OS user, if any
	uid, gid int
	mu       sync.Mutex
	running  map[string]bool // data directory -> its server may be running
	link     *delayProxy     // the replication link, when delayed
}

// clusterUnavailable skips the test with msg, or fails it under CI=true,
// where the failover tests must run.
func clusterUnavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// pgBinDir returns the binaries of the newest PostgreSQL installed.
func pgBinDir() (string, error) {
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_ctl")
	if len(found) == 0 {
		return "", errors.New("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (install postgresql)")
	}
	version := func(p string) float64 {
		v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(filepath.Dir(p))), 64)
		return v
	}
	sort.Slice(found, func(i, j int) bool { return version(found[i]) > version(found[j]) })
	return filepath.Dir(found[0]), nil
}

const pairDirPattern = "pgstore-failover-"

// startPair starts a primary on primaryPort and a standby on standbyPort,
// streaming from it, synchronous (synchronous_standby_names names it, with
// synchronous_commit=on: a commit is answered once the standby has flushed
// it) or asynchronous. Both have a database "test". Both servers are
// stopped and their directory removed when the test ends, whatever its
// outcome.
//
// Settings: shared_buffers=16MB and max_connections=40 keep startup small;
// fsync stays on (the default) on both servers, so the commits measured
// are durable ones.
//
// A replicationDelay above zero puts a delayProxy on the replication link:
// every byte from the primary reaches the standby that much later (and its
// acknowledgements go back as late), as over a network.
func startPair(t testing.TB, synchronous bool, replicationDelay time.Duration) *pgPair {
	t.Helper()
	bin, err := pgBinDir()
	if err != nil {
		clusterUnavailable(t, "failover tests: %v", err)
	}
	p := &pgPair{t: t, bin: bin, running: map[string]bool{}, uid: -1, gid: -1}
	if os.Geteuid() == 0 {
		// The server refuses to run as root: everything runs as the
		// postgres OS user, in directories it owns.
		u, err := user.Lookup("postgres")
		if err != nil {
			clusterUnavailable(t, "failover tests run as root and need the postgres OS user to run the servers: %v", err)
		}
		p.uid, _ = strconv.Atoi(u.Uid)
		p.gid, _ = strconv.Atoi(u.Gid)
		p.asUser = []string{"runuser", "-u", "postgres", "--"}
	}
	stopLeftovers(t, bin)
	for _, port := range []int{primaryPort, standbyPort} {
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second); err == nil {
			c.Close()
			clusterUnavailable(t, "failover tests: port %d is taken by another process; they start their own PostgreSQL servers on ports %d and %d", port, primaryPort, standbyPort)
		}
	}
	p.dir, err = os.MkdirTemp("", pairDirPattern)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.cleanup)
	if err := os.WriteFile(filepath.Join(p.dir, "owner"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		t.Fatal(err)
	}
	p.chown(p.dir)

	primary, standby := p.data("primary"), p.data("standby")
	p.run("initdb", "-D", primary, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
	p.appendConf(primary, map[string]string{
		"listen_addresses":        "'127.0.0.1'",
		"port":                    strconv.Itoa(primaryPort),
		"unix_socket_directories": "'" + p.dir + "'",
		"shared_buffers":          "'16MB'",
		"max_connections":         "40",
		"wal_level":               "replica",
		"max_wal_senders":         "4",
		"wal_keep_size":           "'64MB'",
		"synchronous_commit":      "on",
		"fsync":                   "on",
	})
	p.start(primary)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin := p.connect(ctx, primaryPort, "postgres")
	if _, err := admin.Exec(ctx, "CREATE DATABASE test"); err != nil {
		t.Fatalf("create database test: %v", err)
	}
	p.run("pg_basebackup", "-h", "127.0.0.1", "-p", strconv.Itoa(primaryPort), "-U", "postgres",
		"-D", standby, "-R", "-X", "stream", "-c", "fast", "--no-sync")
	upstream := primaryPort
	if replicationDelay > 0 {
		p.link = newDelayProxyTo(t, fmt.Sprintf("127.0.0.1:%d", primaryPort))
		p.link.setDelay(replicationDelay)
		upstream = p.link.ln.Addr().(*net.TCPAddr).Port
	}
	// pg_basebackup -R wrote standby.signal, and primary_conninfo in
	// postgresql.auto.conf, which this line overrides.
	autoConf, err := os.OpenFile(filepath.Join(standby, "postgresql.auto.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = fmt.Fprintf(autoConf, "primary_conninfo = 'host=127.0.0.1 port=%d user=postgres sslmode=disable'\n", upstream)
	if cerr := autoConf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	p.appendConf(standby, map[string]string{
		"port": strconv.Itoa(standbyPort),
		// The walreceiver's application_name, which
		// synchronous_standby_names names.
		"cluster_name": "'standby'",
		// Promoted, it has no standby of its own: with the primary's
		// setting, every commit would wait for one forever.
		"synchronous_standby_names": "''",
	})
	p.start(standby)
	want := "async"
	if synchronous {
		// Set once the standby exists: before, every commit (CREATE
		// DATABASE's too) would wait for it.
		want = "sync"
		if _, err := admin.Exec(ctx, "ALTER SYSTEM SET synchronous_standby_names = 'standby'"); err != nil {
			t.Fatal(err)
		}
		if _, err := admin.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
			t.Fatal(err)
		}
	}
	for {
		var state string
		err := admin.QueryRow(ctx, `SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby' AND state = 'streaming'`).Scan(&state)
		if err == nil && state == want {
			break
		}
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			t.Fatalf("waiting for the standby: %v", err)
		}
		if ctx.Err() != nil {
			t.Fatalf("the standby is not streaming (%s) after 30s (state %q); its log:\n%s", want, state, p.log("standby"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	admin.Close(ctx)
	return p
}

// stopLeftovers stops the servers, and removes the directories, that
// earlier runs left behind when their process died before its cleanup ran
// (a killed go test): they would hold the ports. Directories of a live
// process (another run now) are left alone.
func stopLeftovers(t testing.TB, bin string) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), pairDirPattern+"*"))
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, "owner"))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid == os.Getpid() || syscall.Kill(pid, 0) != syscall.ESRCH {
			continue
		}
		for _, data := range []string{"primary", "standby"} {
			data = filepath.Join(dir, data)
			if _, err := os.Stat(filepath.Join(data, "postmaster.pid")); err == nil {
				t.Logf("stopping the server an earlier run left in %s", data)
				stopServer(bin, data)
			}
		}
		os.RemoveAll(dir)
	}
}

// stopServer stops the server of data at once, as root or not; errors are
// ignored (it may not be running).
func stopServer(bin, data string) {
	args := []string{filepath.Join(bin, "pg_ctl"), "stop", "-D", data, "-m", "immediate", "-w", "-t", "30"}
	if os.Geteuid() == 0 {
		args = append([]string{"runuser", "-u", "postgres", "--"}, args...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	exec.CommandContext(ctx, args[0], args[1:]...).Run()
}

func (p *pgPair) data(name string) string { return filepath.Join(p.dir, name) }

func (p *pgPair) chown(path string) {
	if p.uid >= 0 {
		if err := os.Chown(path, p.uid, p.gid); err != nil {
			p.t.Fatal(err)
		}
	}
}

// run runs a PostgreSQL program (as the postgres OS user when root) and
// fails the test if it fails.
func (p *pgPair) run(program string, args ...string) {
	p.t.Helper()
	if err := p.try(program, args...); err != nil {
		p.t.Fatal(err)
	}
}

func (p *pgPair) try(program string, args ...string) error {
	argv := append(append(append([]string{}, p.asUser...), filepath.Join(p.bin, program)), args...)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Dir = p.dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %v\n%s", strings.Join(argv, " "), err, out.String())
	}
	return nil
}

// appendConf appends settings to data's postgresql.conf; later lines win.
func (p *pgPair) appendConf(data string, settings map[string]string) {
	p.t.Helper()
	var b strings.Builder
	b.WriteString("\n# pgstore failover tests\n")
	names := make([]string, 0, len(settings))
	for name := range settings {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Fprintf(&b, "%s = %s\n", name, settings[name])
	}
	f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		p.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(b.String()); err != nil {
		p.t.Fatal(err)
	}
}

func (p *pgPair) logFile(name string) string { return filepath.Join(p.dir, name+".log") }

// log returns the end of a server's log.
func (p *pgPair) log(name string) string {
	b, _ := os.ReadFile(p.logFile(name))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

func (p *pgPair) start(data string) {
	p.t.Helper()
	p.mu.Lock()
	p.running[data] = true
	p.mu.Unlock()
	p.run("pg_ctl", "start", "-D", data, "-l", p.logFile(filepath.Base(data)), "-w", "-t", "60")
}

// connect opens a connection to one server, for the test's own queries.
func (p *pgPair) connect(ctx context.Context, port int, db string) *pgx.Conn {
	p.t.Helper()
	conn, err := pgx.Connect(ctx, fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", port, db))
	if err != nil {
		p.t.Fatalf("connect to port %d: %v", port, err)
	}
	return conn
}

// crashPrimary stops the primary at once (pg_ctl stop -m immediate): its
// backends are killed without a checkpoint, as in a crash, and the
// connections to it drop. The WAL it had sent still reaches the standby, as
// the kernel delivers what the dead processes wrote to their sockets. With
// a delayed replication link, the link is cut first, and what was on it is
// lost: the primary's host died, or was cut off, with its data in flight.
//
// It returns how long the primary still ran after its link was cut (zero
// without a delayed link): the answers it gave meanwhile are lost to the
// standby too.
func (p *pgPair) crashPrimary() (cutOff time.Duration) {
	p.t.Helper()
	start := time.Now()
	if p.link != nil {
		p.link.close()
	}
	p.run("pg_ctl", "stop", "-D", p.data("primary"), "-m", "immediate", "-w", "-t", "30")
	if p.link != nil {
		cutOff = time.Since(start)
	}
	p.mu.Lock()
	p.running[p.data("primary")] = false
	p.mu.Unlock()
	return cutOff
}

// promote makes the standby a primary (pg_ctl promote), and returns once it
// takes writes.
func (p *pgPair) promote() {
	p.t.Helper()
	p.run("pg_ctl", "promote", "-D", p.data("standby"), "-w", "-t", "60")
}

func (p *pgPair) cleanup() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for data, running := range p.running {
		if running {
			stopServer(p.bin, data)
		}
	}
	if p.t.Failed() {
		for _, name := range []string{"primary", "standby"} {
			p.t.Logf("the end of the %s's log:\n%s", name, p.log(name))
		}
	}
	os.RemoveAll(p.dir)
}
