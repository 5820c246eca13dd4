// Command benchreport runs the benchmarks behind the performance targets in
// interleaved rounds and prints their medians, spreads and ratios as the
// markdown tables of docs/benchmarks.md and the README.
//
// These machines are shared and noisy, so every ratio is taken within one
// round (a cell against the baseline measured just before it, in the same
// process), and the median of those ratios is reported with its spread (half
// the range of the rounds, as a share of the median). Run it from the
// repository root, with PostgreSQL and Redis up (their rows are left out
// when their benchmarks skip):
//
//	go run ./internal/benchreport -rounds 5
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// A suite is one test binary and the benchmarks a round runs from it.
type suite struct {
	name, pkg string
	runs      []run
}

// A run is one invocation of a test binary within a round.
type run struct {
	bench, benchtime string
}

var suites = []suite{
	{name: "root", pkg: ".", runs: []run{
		{`BenchmarkUnary/(none|memory|bolt)/(baseline|keyed|first|replay)/(p1|p64)$|BenchmarkHandRolled/(first|replay)/(p1|p64)$`, "1s"},
		{`BenchmarkBoltCommit/(same-record|in-handler)$|BenchmarkUnary/(none|bolt)/(baseline|first)/p1$`, "400x"},
		{`BenchmarkBlockingHandler|BenchmarkUnary/none/baseline/p1$`, "1000x"},
		{`BenchmarkServerStream`, "1s"},
	}},
	{name: "pg", pkg: "./pgstore", runs: []run{
		{`BenchmarkInterceptor/(baseline|first|replay)/(p1|p64)$|BenchmarkDurableInsert/p1$`, "1s"},
	}},
	{name: "redis", pkg: "./redisstore", runs: []run{
		{`BenchmarkUnary`, "1s"},
	}},
}

// results holds, per round, per suite, per cell (run index and benchmark
// name), the metrics of its line: "ns/op", "allocs/op", "cpu-µs/op" and so on.
type results map[string][]map[string]float64 // "suite/run/name" -> rounds

func main() {
	rounds := flag.Int("rounds", 5, "interleaved rounds of every benchmark")
	only := flag.String("only", "", "run only the suites whose name matches this regexp (root, pg, redis)")
	raw := flag.String("raw", "", "also write the raw benchmark output to this file")
	flag.Parse()

	dir, err := os.MkdirTemp("", "benchreport")
	check(err)
	defer os.RemoveAll(dir)
	var out io.Writer = io.Discard
	if *raw != "" {
		f, err := os.Create(*raw)
		check(err)
		defer f.Close()
		out = f
	}

	var todo []suite
	for _, s := range suites {
		if *only != "" && !regexp.MustCompile(*only).MatchString(s.name) {
			continue
		}
		bin := filepath.Join(dir, s.name+".test")
		cmd := exec.Command("go", "test", "-c", "-o", bin, s.pkg)
		cmd.Stderr = os.Stderr
		check(cmd.Run())
		todo = append(todo, s)
	}

	res := results{}
	start := time.Now()
	for r := range *rounds {
		for _, s := range todo {
			for i, rn := range s.runs {
				bin := filepath.Join(dir, s.name+".test")
				cmd := exec.Command(bin, "-test.run", "^$", "-test.bench", rn.bench,
					"-test.benchtime", rn.benchtime, "-test.benchmem")
				cmd.Dir = s.pkg
				var buf bytes.Buffer
				cmd.Stdout = &buf
				cmd.Stderr = &buf
				if err := cmd.Run(); err != nil {
					fmt.Fprintf(os.Stderr, "%s %s: %v\n%s", s.name, rn.bench, err, buf.String())
					os.Exit(1)
				}
				fmt.Fprintf(out, "# round %d %s %s\n%s", r+1, s.name, rn.bench, buf.String())
				for name, m := range parse(buf.String()) {
					key := s.name + "/" + strconv.Itoa(i) + "/" + name
					res[key] = append(res[key], m)
				}
			}
		}
		fmt.Fprintf(os.Stderr, "round %d of %d done (%v)\n", r+1, *rounds, time.Since(start).Round(time.Second))
	}
	fmt.Printf("Measured %s to %s, %d interleaved rounds (go run ./internal/benchreport -rounds %d).\n\n",
		start.UTC().Format(time.DateTime), time.Now().UTC().Format(time.DateTime), *rounds, *rounds)
	report(res)
}

var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(-\d+)?\s+(\d+)\s+(.*)$`)

// parse returns the metrics of every benchmark line in out, by name.
func parse(out string) map[string]map[string]float64 {
	got := map[string]map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		fields := strings.Fields(m[4])
		metrics := map[string]float64{}
		for i := 0; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err == nil {
				metrics[fields[i+1]] = v
			}
		}
		got[m[1]] = metrics
	}
	return got
}

// stat is a median and its spread: half the range, as a share of the median.
type stat struct {
	med, spread float64
	ok          bool
}

func summarize(xs []float64) stat {
	if len(xs) == 0 {
		return stat{}
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	spread := 0.0
	if med != 0 {
		spread = (s[len(s)-1] - s[0]) / 2 / med
	}
	return stat{med: med, spread: spread, ok: true}
}

func (s stat) String() string {
	if !s.ok {
		return "n/a"
	}
	return fmt.Sprintf("%s ±%.0f%%", num(s.med), 100*s.spread)
}

func num(v float64) string {
	switch {
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'f', 3, 64)
	}
}

// metric returns, round by round, metric of cell.
func (r results) metric(cell, metric string) []float64 {
	var xs []float64
	for _, m := range r[cell] {
		if v, ok := m[metric]; ok {
			xs = append(xs, v)
		}
	}
	return xs
}

// us returns cell's µs per op, round by round.
func (r results) us(cell string) []float64 {
	xs := r.metric(cell, "ns/op")
	for i := range xs {
		xs[i] /= 1e3
	}
	return xs
}

// per combines two cells round by round with f.
func per(a, b []float64, f func(a, b float64) float64) []float64 {
	n := min(len(a), len(b))
	out := make([]float64, n)
	for i := range n {
		out[i] = f(a[i], b[i])
	}
	return out
}

func ratio(a, b float64) float64 { return a / b }
func diff(a, b float64) float64  { return a - b }

func report(r results) {
	const u = "root/0/BenchmarkUnary/"
	fmt.Println("| store | no interceptor p1 / p64 | first execution p1 | first execution p64 | replay p1 | replay p64 |")
	fmt.Println("| --- | --- | --- | --- | --- | --- |")
	row := func(name, base1, base64, first1, first64, replay1, replay64 string) {
		if !summarize(r.us(first1)).ok {
			return
		}
		cell := func(c, base string, p1 bool) string {
			s := summarize(r.us(c))
			if !s.ok {
				return "n/a"
			}
			if p1 {
				return fmt.Sprintf("%s (%.2f×)", s, summarize(per(r.us(c), r.us(base), ratio)).med)
			}
			return fmt.Sprintf("%s (%.0f%%)", s, 100*summarize(per(r.us(base), r.us(c), ratio)).med)
		}
		fmt.Printf("| %s | %s / %s | %s | %s | %s | %s |\n", name,
			num(summarize(r.us(base1)).med), num(summarize(r.us(base64)).med),
			cell(first1, base1, true), cell(first64, base64, false),
			cell(replay1, base1, true), cell(replay64, base64, false))
	}
	row("memory", u+"none/baseline/p1", u+"none/baseline/p64", u+"memory/first/p1", u+"memory/first/p64", u+"memory/replay/p1", u+"memory/replay/p64")
	const h = "root/0/BenchmarkHandRolled/"
	row("hand-rolled memory table (floor)", u+"none/baseline/p1", u+"none/baseline/p64", h+"first/p1", h+"first/p64", h+"replay/p1", h+"replay/p64")
	row("bbolt", u+"none/baseline/p1", u+"none/baseline/p64", u+"bolt/first/p1", u+"bolt/first/p64", u+"bolt/replay/p1", u+"bolt/replay/p64")
	const ru = "redis/0/BenchmarkUnary/"
	row("Redis", ru+"none/baseline/p1", ru+"none/baseline/p64", ru+"redis/first/p1", ru+"redis/first/p64", ru+"redis/replay/p1", ru+"redis/replay/p64")
	row("Redis floor: two round trips in a bare call's handler", ru+"none/baseline/p1", ru+"none/baseline/p64", ru+"none/two-round-trips/p1", ru+"none/two-round-trips/p64", "", "")
	row("Redis, auto-pipelining", ru+"none/baseline/p1", ru+"none/baseline/p64", ru+"redis-ap/first/p1", ru+"redis-ap/first/p64", ru+"redis-ap/replay/p1", ru+"redis-ap/replay/p64")
	const pg = "pg/0/BenchmarkInterceptor/"
	row("PostgreSQL", pg+"baseline/p1", pg+"baseline/p64", pg+"first/p1", pg+"first/p64", pg+"replay/p1", pg+"replay/p64")
	fmt.Println()

	fmt.Println("| cell | µs/call | CPU µs/call | allocs/call |")
	fmt.Println("| --- | --- | --- | --- |")
	var cells []string
	for c := range r {
		cells = append(cells, c)
	}
	slices.Sort(cells)
	for _, c := range cells {
		extra := ""
		if v := r.metric(c, "pg-be-cpu-µs/op"); len(v) > 0 {
			extra = fmt.Sprintf(" (PostgreSQL backends %s)", num(summarize(v).med))
		} else if v := r.metric(c, "pg-cpu-µs/op"); len(v) > 0 {
			extra = fmt.Sprintf(" (PostgreSQL %s)", num(summarize(v).med))
		}
		if v := r.metric(c, "redis-cpu-µs/op"); len(v) > 0 {
			extra = fmt.Sprintf(" (Redis %s)", num(summarize(v).med))
		}
		allocs := "n/a"
		if v := r.metric(c, "allocs/op"); len(v) > 0 {
			allocs = num(summarize(v).med)
		}
		cpu := "n/a"
		if v := r.metric(c, "cpu-µs/op"); len(v) > 0 {
			cpu = num(summarize(v).med) + extra
		}
		fmt.Printf("| %s | %s | %s | %s |\n", label(c), summarize(r.us(c)), cpu, allocs)
	}
	fmt.Println()

	fmt.Println("| target | measured (median of the rounds' ratios, ± half their range) |")
	fmt.Println("| --- | --- |")
	target := func(name string, xs []float64, format string) {
		s := summarize(xs)
		if !s.ok {
			fmt.Printf("| %s | n/a |\n", name)
			return
		}
		fmt.Printf("| %s | "+format+" ±%.0f%% |\n", name, s.med, 100*s.spread)
	}
	target("memory first execution p1, share of a bare call (≥ 0.85)",
		per(r.us(u+"none/baseline/p1"), r.us(u+"memory/first/p1"), ratio), "%.2f")
	target("hand-rolled memory table first execution p1, share of a bare call (the floor)",
		per(r.us(u+"none/baseline/p1"), r.us(h+"first/p1"), ratio), "%.2f")
	target("memory first execution p1 ÷ hand-rolled table's",
		per(r.us(u+"memory/first/p1"), r.us(h+"first/p1"), ratio), "%.2f")
	target("memory first execution p1, allocations over a bare call (≤ 20)",
		per(r.metric(u+"memory/first/p1", "allocs/op"), r.metric(u+"none/baseline/p1", "allocs/op"), diff), "%.0f")
	target("memory replay p1, allocations over a bare call (≤ 15)",
		per(r.metric(u+"memory/replay/p1", "allocs/op"), r.metric(u+"none/baseline/p1", "allocs/op"), diff), "%.0f")
	const bc = "root/1/"
	bare, first := r.us(bc+"BenchmarkUnary/none/baseline/p1"), r.us(bc+"BenchmarkUnary/bolt/first/p1")
	commit, inHandler := r.us(bc+"BenchmarkBoltCommit/same-record"), r.us(bc+"BenchmarkBoltCommit/in-handler")
	target("bbolt first execution p1 ÷ (bare + 1.15 × same-record commit) (≤ 1)",
		per(first, per(bare, commit, func(b, c float64) float64 { return b + 1.15*c }), ratio), "%.2f")
	target("bbolt: the same commit made by a bare call's handler ÷ (bare + same-record commit)",
		per(inHandler, per(bare, commit, func(b, c float64) float64 { return b + c }), ratio), "%.2f")
	target("bbolt first execution p1 ÷ the same commit made by a bare call's handler",
		per(first, inHandler, ratio), "%.2f")
	const bh = "root/2/"
	target("a 300 µs blocking syscall in a handler: µs beyond bare + the syscall alone",
		per(r.us(bh+"BenchmarkBlockingHandler/in-handler"),
			per(r.us(bh+"BenchmarkUnary/none/baseline/p1"), r.us(bh+"BenchmarkBlockingHandler/raw"), func(a, b float64) float64 { return a + b }), diff), "%.1f")
	const ss = "root/3/BenchmarkServerStream/"
	target("100-message server-stream replay ÷ bare stream (≤ 1.2)",
		per(r.us(ss+"bolt/replay"), r.us(ss+"bolt/baseline"), ratio), "%.2f")
	target("PostgreSQL first execution p1, share of a bare call (≥ 0.084)",
		per(r.us(pg+"baseline/p1"), r.us(pg+"first/p1"), ratio), "%.3f")
	target("Redis first execution p1 ÷ two round trips made in a bare call's handler (the floor)",
		per(r.us(ru+"redis/first/p1"), r.us(ru+"none/two-round-trips/p1"), ratio), "%.2f")
	target("Redis first execution p64 ÷ two round trips made in a bare call's handler",
		per(r.us(ru+"redis/first/p64"), r.us(ru+"none/two-round-trips/p64"), ratio), "%.2f")
	target("Redis auto-pipelining p64, first execution speed-up",
		per(r.us(ru+"redis/first/p64"), r.us(ru+"redis-ap/first/p64"), ratio), "%.2f")
	target("Redis auto-pipelining p64, replay speed-up",
		per(r.us(ru+"redis/replay/p64"), r.us(ru+"redis-ap/replay/p64"), ratio), "%.2f")
}

// label names a cell for the tables: its package and benchmark, and which
// run of the round it came from when that is not the package's first.
func label(cell string) string {
	suite, rest, _ := strings.Cut(cell, "/")
	i, name, _ := strings.Cut(rest, "/")
	name = strings.TrimPrefix(name, "Benchmark")
	if i != "0" {
		name += " (run " + i + ")"
	}
	if suite != "root" {
		name = suite + ": " + name
	}
	return name
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
}
