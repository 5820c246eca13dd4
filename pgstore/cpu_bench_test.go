package pgstore_test

import (
	"context"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/grpcidem/idempotency/internal/cpuclock"
)

// cpuMeter reports where the CPU goes during a benchmark's timed loop, as two
// metrics per op:
//
//   - cpu-µs/op: the CPU time (user and system) of this test process: the
//     callers, the gRPC client and server, pgx and the Go runtime;
//   - pg-cpu-µs/op: the CPU time of the PostgreSQL server, its postmaster and
//     all its backends, read from /proc. Only when the server runs on this
//     host and /proc is readable; otherwise the metric is left out.
//   - pg-be-cpu-µs/op: the part of it spent by the backends of the
//     benchmark's own pool (found by its application_name, see benchPool),
//     read from /proc/<pid>/schedstat in nanoseconds. It leaves out the
//     server's background processes (WAL writer, checkpointer, autovacuum)
//     and, above all, every other client of a shared server, which
//     pg-cpu-µs/op counts too.
//
// At p64 the benchmark, the gRPC stack and PostgreSQL share the machine's
// cores, so (cpu-µs/op + pg-cpu-µs/op) / cores is a floor on µs/op: no store
// can make a benchmark run faster than the cores can serve both sides.
type cpuMeter struct {
	postmaster int           // pid; 0 when the server's CPU cannot be read
	self, pg   time.Duration // at start
	selfOK     bool
	pgOK       bool
	pool       *pgxpool.Pool
	backends   map[int]time.Duration // the pool's backends' CPU at start
}

// newCPUMeter finds the postmaster as the parent of one of pool's backends.
func newCPUMeter(pool *pgxpool.Pool) *cpuMeter {
	var backend int
	if err := pool.QueryRow(context.Background(), "SELECT pg_backend_pid()").Scan(&backend); err != nil {
		return &cpuMeter{}
	}
	be, ok := readProcStat(strconv.Itoa(backend))
	if !ok || !isPostgres(be.comm) || be.ppid <= 1 {
		return &cpuMeter{} // the server is not on this host (or not visible)
	}
	if pm, ok := readProcStat(strconv.Itoa(be.ppid)); !ok || !isPostgres(pm.comm) {
		return &cpuMeter{}
	}
	return &cpuMeter{postmaster: be.ppid, pool: pool}
}

// poolBackends returns the CPU time of each backend serving the meter's
// pool, or nil if they cannot be read. The pool is recognized by its
// application_name, which benchPool makes unique.
func (m *cpuMeter) poolBackends() map[int]time.Duration {
	app := m.pool.Config().ConnConfig.RuntimeParams["application_name"]
	if app == "" {
		return nil
	}
	rows, err := m.pool.Query(context.Background(), "SELECT pid FROM pg_stat_activity WHERE application_name = $1", app)
	if err != nil {
		return nil
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		return nil
	}
	cpu := make(map[int]time.Duration, len(pids))
	for _, pid := range pids {
		if d, ok := readSchedCPU(strconv.Itoa(pid)); ok {
			cpu[pid] = d
		}
	}
	return cpu
}

// readSchedCPU returns a process's time on a CPU, in nanoseconds (the first
// field of /proc/<pid>/schedstat).
func readSchedCPU(pid string) (time.Duration, bool) {
	data, err := os.ReadFile("/proc/" + pid + "/schedstat")
	if err != nil {
		return 0, false
	}
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return 0, false
	}
	ns, err := strconv.ParseInt(f[0], 10, 64)
	return time.Duration(ns), err == nil
}

func isPostgres(comm string) bool { return comm == "postgres" || comm == "postmaster" }

// start is called just before the timed loop, stop just after it. The /proc
// scans are kept out of this process's own measure.
func (m *cpuMeter) start() {
	if m.postmaster != 0 {
		m.backends = m.poolBackends()
		m.pg, m.pgOK = serverCPU(m.postmaster)
	}
	m.self, m.selfOK = cpuclock.Process()
}

func (m *cpuMeter) stop(b *testing.B) {
	perOp := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) / float64(b.N) }
	if self, ok := cpuclock.Process(); ok && m.selfOK && b.N > 0 {
		b.ReportMetric(perOp(self-m.self), "cpu-µs/op")
	}
	if m.pgOK && b.N > 0 {
		if pg, ok := serverCPU(m.postmaster); ok {
			b.ReportMetric(perOp(pg-m.pg), "pg-cpu-µs/op")
		}
		if m.backends != nil {
			if now := m.poolBackends(); now != nil {
				var d time.Duration
				for pid, cpu := range now {
					d += cpu - m.backends[pid] // a backend started meanwhile counts whole
				}
				b.ReportMetric(perOp(d), "pg-be-cpu-µs/op")
			}
		}
	}
}

// serverCPU is the CPU time of the postmaster, of its children that have
// exited (its cutime and cstime: a backend's time moves there when the
// postmaster reaps it) and of its live children.
func serverCPU(postmaster int) (time.Duration, bool) {
	pm, ok := readProcStat(strconv.Itoa(postmaster))
	if !ok {
		return 0, false
	}
	ticks := pm.utime + pm.stime + pm.cutime + pm.cstime
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, false
	}
	for _, e := range entries {
		if name := e.Name(); name[0] >= '1' && name[0] <= '9' {
			if c, ok := readProcStat(name); ok && c.ppid == postmaster {
				ticks += c.utime + c.stime
			}
		}
	}
	// Clock ticks: CLK_TCK (sysconf(_SC_CLK_TCK)) is 100 on Linux.
	return time.Duration(ticks) * (time.Second / 100), true
}

// procStat holds the fields of /proc/<pid>/stat that serverCPU needs; times
// are in clock ticks.
type procStat struct {
	comm                         string
	ppid                         int
	utime, stime, cutime, cstime int64
}

func readProcStat(pid string) (procStat, bool) {
	data, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return procStat{}, false
	}
	// Field 2, comm, is in parentheses and may hold spaces and ')': the
	// other fields follow the last ')'.
	s := string(data)
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || end < open {
		return procStat{}, false
	}
	f := strings.Fields(s[end+1:]) // f[0] is field 3, so field n is f[n-3]
	var v [5]int64
	for i, n := range []int{4, 14, 15, 16, 17} {
		if n-3 >= len(f) {
			return procStat{}, false
		}
		if v[i], err = strconv.ParseInt(f[n-3], 10, 64); err != nil {
			return procStat{}, false
		}
	}
	return procStat{comm: s[open+1 : end], ppid: int(v[0]), utime: v[1], stime: v[2], cutime: v[3], cstime: v[4]}, true
}
