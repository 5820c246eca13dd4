package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/examples/payments/service"
	paymentsv1 "github.com/grpcidem/idempotency/examples/proto/payments/v1"

	"github.com/grpcidem/idempotency/boltstore"
)

// demoConfig sizes the demo and its faults.
type demoConfig struct {
	unary, streams, parts int
	concurrency           int
	dropEvery, failEvery  int
	doubleEvery           int
	delay                 time.Duration
	maxAttempts           int
	verbose               bool
	dir                   string
	backoff, maxBackoff   time.Duration
	timeout               time.Duration
	// noIdempotency serves without the idempotency interceptors (a test
	// breaks the server on purpose).
	noIdempotency bool
}

// RunDemo is the demo command; see ../../demo.
func RunDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var c demoConfig
	fs.IntVar(&c.unary, "unary", 40, "unary payments (Charge)")
	fs.IntVar(&c.streams, "streams", 10, "payments of each streaming kind (ChargeInstallments, ChargeBatch, ChargeInteractive)")
	fs.IntVar(&c.parts, "parts", 3, "charges per streaming payment")
	fs.IntVar(&c.concurrency, "concurrency", 8, "payments in flight at once")
	fs.IntVar(&c.dropEvery, "drop-every", 4, "the link loses the answer of every Nth call, after the server ran it (0: never)")
	fs.IntVar(&c.failEvery, "fail-every", 5, "the service fails every Nth execution with Unavailable (0: never)")
	fs.IntVar(&c.doubleEvery, "double-every", 5, "every Nth unary payment is sent twice at once, with the same key (0: never)")
	fs.DurationVar(&c.delay, "delay", 20*time.Millisecond, "how long each execution takes, so that double submits overlap")
	fs.IntVar(&c.maxAttempts, "attempts", 10, "calls per payment at most")
	fs.BoolVar(&c.verbose, "v", false, "print every payment")
	fs.StringVar(&c.dir, "dir", "", "directory for the bbolt file (default: a temporary one, removed at the end)")
	if err := parse(fs, args); err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		v    int
	}{{"unary", c.unary}, {"streams", c.streams}, {"drop-every", c.dropEvery}, {"fail-every", c.failEvery}, {"double-every", c.doubleEvery}} {
		if f.v < 0 {
			return fmt.Errorf("-%s is %d; it must not be negative", f.name, f.v)
		}
	}
	if c.parts < 1 || c.parts > service.MaxInstallments {
		return fmt.Errorf("-parts is %d; it must be between 1 and %d", c.parts, service.MaxInstallments)
	}
	if c.concurrency < 1 || c.maxAttempts < 1 {
		return errors.New("-concurrency and -attempts must be at least 1")
	}
	c.backoff, c.maxBackoff, c.timeout = 5*time.Millisecond, 100*time.Millisecond, 30*time.Second
	return runDemo(ctx, c, stdout)
}

// demoPayment is one logical payment of the demo and what came of it.
type demoPayment struct {
	Payment
	twice    bool
	receipts []Receipt
	err      error
}

type ledger struct {
	mu   sync.Mutex
	runs map[string][][]string // by key: the charge ids of each execution
}

func (l *ledger) executed(ctx context.Context, _ string, charges []*paymentsv1.ChargeResponse) {
	var key string
	if e := idempotency.ExecutionFromContext(ctx); e != nil {
		key = e.Key
	} else if v := metadata.ValueFromIncomingContext(ctx, idempotency.KeyHeader); len(v) > 0 {
		// Without idempotency (a broken server) the handler runs with no
		// Execution; the key still says which payment it was.
		key = v[0]
	}
	ids := make([]string, len(charges))
	for i, c := range charges {
		ids[i] = c.GetChargeId()
	}
	l.mu.Lock()
	l.runs[key] = append(l.runs[key], ids)
	l.mu.Unlock()
}

// of returns the charge ids of each execution of key.
func (l *ledger) of(key string) [][]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.runs[key])
}

type eventsByMethod struct {
	mu sync.Mutex
	n  map[string]map[idempotency.EventKind]int
}

func (e *eventsByMethod) observe(_ context.Context, ev idempotency.Event) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.n[ev.Method] == nil {
		e.n[ev.Method] = make(map[idempotency.EventKind]int)
	}
	e.n[ev.Method][ev.Kind]++
}

func (e *eventsByMethod) count(method string, kind idempotency.EventKind) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.n[method][kind]
}

// demoServer is a payments server on loopback TCP.
type demoServer struct {
	srv    *grpc.Server
	addr   string
	served chan error
}

func startDemoServer(store idempotency.Store, svc paymentsv1.PaymentServiceServer, cfg ServerConfig) (*demoServer, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	srv, err := NewServer(store, svc, cfg)
	if err != nil {
		lis.Close()
		return nil, err
	}
	s := &demoServer{srv: srv, addr: lis.Addr().String(), served: make(chan error, 1)}
	go func() { s.served <- s.srv.Serve(lis) }()
	return s, nil
}

func (s *demoServer) stop() error {
	stopGracefully(s.srv, 5*time.Second)
	return <-s.served
}

func runDemo(ctx context.Context, c demoConfig, stdout io.Writer) (err error) {
	start := time.Now()
	dir := c.dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "idempotency-demo-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	dbPath := filepath.Join(dir, "payments-idem.db")
	metrics := newDemoMetrics()
	store, err := boltstore.Open(dbPath, boltstore.WithCommitObserver(metrics.tel.BoltCommits))
	if err != nil {
		return err
	}
	defer func() {
		if store != nil {
			err = errors.Join(err, store.Close())
		}
	}()

	led := &ledger{runs: make(map[string][][]string)}
	events := &eventsByMethod{n: make(map[string]map[idempotency.EventKind]int)}
	svc := service.New(service.WithDelay(c.delay), service.WithFailEvery(c.failEvery), service.WithExecutedHook(led.executed))
	cfg := ServerConfig{Logger: slog.New(slog.DiscardHandler), Observe: events.observe, WithoutIdempotency: c.noIdempotency,
		Options: []idempotency.Option{metrics.tel.ServerOption()}, Context: ctx}
	server, err := startDemoServer(store, svc, cfg)
	if err != nil {
		return err
	}
	defer func() {
		if server != nil {
			err = errors.Join(err, server.stop())
		}
	}()

	lk := newLink(c.dropEvery)
	conn, err := Dial(server.addr, c.maxAttempts,
		// Below the idempotency interceptors (Dial puts them first), so
		// that they see the link's losses and retry.
		grpc.WithChainUnaryInterceptor(lk.unary),
		grpc.WithChainStreamInterceptor(lk.stream),
	)
	if err != nil {
		return err
	}
	defer conn.Close()
	p := newPayer(conn, c.maxAttempts, c.backoff, c.maxBackoff)

	payments := c.plan()
	runPayments(ctx, p, payments, c)

	fmt.Fprintf(stdout, "%d payments, %d at a time, to a payments server on %s with a bbolt store.\n", len(payments), c.concurrency, server.addr)
	var faults []string
	if c.dropEvery > 0 {
		faults = append(faults, "the link loses "+every(c.dropEvery, "answer")+" after the server ran the call")
	}
	if c.failEvery > 0 {
		faults = append(faults, "the service fails "+every(c.failEvery, "execution")+" with Unavailable")
	}
	if c.doubleEvery > 0 && c.unary > 0 {
		faults = append(faults, every(c.doubleEvery, "unary payment")+" is sent twice at once")
	}
	if len(faults) == 0 {
		faults = append(faults, "none")
	}
	fmt.Fprintf(stdout, "Faults:\n  - %s\nClients retry with the same idempotency key.\n\n", strings.Join(faults, "\n  - "))
	if c.verbose {
		for _, pm := range payments {
			for _, rc := range pm.receipts {
				fmt.Fprintf(stdout, "  %-12s %s  attempts %d  replayed %-5t  %v\n", pm.Mode, pm.Key, rc.Attempts, rc.Replayed, rc.ChargeIDs())
			}
			if pm.err != nil {
				fmt.Fprintf(stdout, "  %-12s %s  error: %v\n", pm.Mode, pm.Key, pm.err)
			}
		}
		fmt.Fprintln(stdout)
	}

	problems := report(stdout, payments, svc, lk, events, led)

	// The stored outcomes outlive the process: restart on the same file
	// and retry the first payment.
	if err := server.stop(); err != nil {
		problems = append(problems, fmt.Sprintf("server: %v", err))
	}
	server = nil
	if err := store.Close(); err != nil {
		problems = append(problems, fmt.Sprintf("closing the store: %v", err))
	}
	store = nil
	problems = append(problems, restart(ctx, c, dbPath, svc, cfg, payments, stdout)...)

	if err := metrics.print(stdout); err != nil {
		problems = append(problems, fmt.Sprintf("metrics: %v", err))
	}
	fmt.Fprintf(stdout, "\nFinished in %.1fs.\n", time.Since(start).Seconds())
	if len(problems) > 0 {
		fmt.Fprintln(stdout, "\nFAILED:")
		for _, pr := range problems {
			fmt.Fprintln(stdout, "  "+pr)
		}
		return fmt.Errorf("%s found", plural(len(problems), "problem"))
	}
	return nil
}

// plan lists the demo's payments, the kinds interleaved so that they run
// side by side.
func (c demoConfig) plan() []*demoPayment {
	var out []*demoPayment
	add := func(mode string, i int, amount int64, parts int, twice bool) {
		out = append(out, &demoPayment{Payment: Payment{
			Mode: mode, Key: idempotency.NewKey(), Account: fmt.Sprintf("acct_%s_%02d", mode, i),
			AmountCents: amount, Currency: "EUR", Parts: parts,
		}, twice: twice})
	}
	for i := 0; i < max(c.unary, c.streams); i++ {
		if i < c.unary {
			add("unary", i+1, int64(1000+i), 1, c.doubleEvery > 0 && (i+1)%c.doubleEvery == 0)
		}
		if i < c.streams {
			for _, mode := range Modes[1:] {
				add(mode, i+1, int64(3000+i), c.parts, false)
			}
		}
	}
	return out
}

func runPayments(ctx context.Context, p *payer, payments []*demoPayment, c demoConfig) {
	jobs := make(chan *demoPayment)
	var wg sync.WaitGroup
	for range c.concurrency {
		wg.Go(func() {
			for pm := range jobs {
				pay(ctx, p, pm, c.timeout)
			}
		})
	}
	for _, pm := range payments {
		jobs <- pm
	}
	close(jobs)
	wg.Wait()
}

// pay makes one logical payment: once, or twice at the same time with the
// same key (a double-click, or two replicas of a client).
func pay(ctx context.Context, p *payer, pm *demoPayment, timeout time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	copies := 1
	if pm.twice {
		copies = 2
	}
	receipts := make([]Receipt, copies)
	errs := make([]error, copies)
	var wg sync.WaitGroup
	for i := range copies {
		wg.Go(func() { receipts[i], errs[i] = p.pay(ctx, pm.Payment) })
	}
	wg.Wait()
	pm.receipts, pm.err = receipts, errors.Join(errs...)
}

// report prints the table and returns what went wrong.
func report(w io.Writer, payments []*demoPayment, svc *service.Service, lk *link, events *eventsByMethod, led *ledger) []string {
	var problems []string
	type row struct {
		payments, attempts, dropped, injected, replays, conflicts, executions int
	}
	rows := make(map[string]*row)
	for _, pm := range payments {
		m := methodOf[pm.Mode]
		if rows[m] == nil {
			rows[m] = new(row)
		}
		rows[m].payments++
		if pm.err != nil {
			problems = append(problems, fmt.Sprintf("%s payment %s failed: %v", pm.Mode, pm.Key, pm.err))
			continue
		}
		runs := led.of(pm.Key)
		if len(runs) != 1 {
			problems = append(problems, fmt.Sprintf("%s payment %s was executed %d times", pm.Mode, pm.Key, len(runs)))
			continue
		}
		for _, rc := range pm.receipts {
			if !slices.Equal(rc.ChargeIDs(), runs[0]) {
				problems = append(problems, fmt.Sprintf("%s payment %s: a client got charges %v, but its execution made %v", pm.Mode, pm.Key, rc.ChargeIDs(), runs[0]))
			}
		}
	}

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "%-18s\tpayments\tattempts\tanswers lost\tUnavailable injected\treplays\texecutions\t\n", "RPC")
	var total row
	for _, m := range PaymentMethods {
		r := rows[m]
		if r == nil {
			continue
		}
		ls, st := lk.statsOf(m), svc.StatsOf(m)
		r.attempts, r.dropped = ls.attempts, ls.dropped
		r.injected, r.executions = int(st.Injected), int(st.Executions)
		r.replays, r.conflicts = events.count(m, idempotency.EventReplayed), events.count(m, idempotency.EventConflict)
		name := m[len("/payments.v1.PaymentService/"):]
		fmt.Fprintf(tw, "%-18s\t%d\t%d\t%d\t%d\t%d\t%d\t\n", name, r.payments, r.attempts, r.dropped, r.injected, r.replays, r.executions)
		if r.executions != r.payments {
			problems = append(problems, fmt.Sprintf("%s: %d handler executions for %d payments", name, r.executions, r.payments))
		}
		// Every attempt that reached the server ran the handler (to
		// charge, or to fail on purpose) or was answered from the store.
		if runs := int(st.Runs); r.attempts != runs+r.replays+r.conflicts {
			problems = append(problems, fmt.Sprintf("%s: %d attempts, but %d handler runs, %d replays and %d aborted duplicates", name, r.attempts, runs, r.replays, r.conflicts))
		}
		total.payments += r.payments
		total.attempts += r.attempts
		total.dropped += r.dropped
		total.injected += r.injected
		total.replays += r.replays
		total.executions += r.executions
	}
	fmt.Fprintf(tw, "%-18s\t%d\t%d\t%d\t%d\t%d\t%d\t\n", "total", total.payments, total.attempts, total.dropped, total.injected, total.replays, total.executions)
	_ = tw.Flush()

	fmt.Fprintf(w, "\nEach attempt ran the handler (an execution, or an injected failure, which is not stored)\nor was answered from the store (a replay).\n")
	fmt.Fprintf(w, "Duplicates prevented: %d. Each retry after a lost answer, and each second copy of a\ndouble submit, got the stored outcome of the first execution instead of charging again.\n", total.replays)
	verdict := "OK"
	if total.executions != total.payments {
		verdict = "MISMATCH"
	}
	fmt.Fprintf(w, "Handler executions: %d for %d logical payments: %s.\n", total.executions, total.payments, verdict)
	return problems
}

// restart opens the bbolt file again behind a new server, and retries the
// first payment: the answer must still be a replay of its one execution.
func restart(ctx context.Context, c demoConfig, dbPath string, svc *service.Service, cfg ServerConfig, payments []*demoPayment, w io.Writer) []string {
	if len(payments) == 0 || payments[0].err != nil {
		return nil
	}
	first := payments[0]
	before := svc.Stats().Executions
	store, err := boltstore.Open(dbPath)
	if err != nil {
		return []string{fmt.Sprintf("reopening %s: %v", dbPath, err)}
	}
	defer store.Close()
	server, err := startDemoServer(store, svc, cfg)
	if err != nil {
		return []string{err.Error()}
	}
	defer server.stop()
	conn, err := Dial(server.addr, c.maxAttempts)
	if err != nil {
		return []string{err.Error()}
	}
	defer conn.Close()
	rctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	rc, err := newPayer(conn, c.maxAttempts, c.backoff, c.maxBackoff).pay(rctx, first.Payment)
	if err != nil {
		return []string{fmt.Sprintf("retry after the restart: %v", err)}
	}
	want := first.receipts[0].ChargeIDs()
	fmt.Fprintf(w, "After a restart on the same bbolt file, a retry of the first payment got charge %s again (replayed: %t).\n", rc.ChargeIDs()[0], rc.Replayed)
	if !rc.Replayed || !slices.Equal(rc.ChargeIDs(), want) || svc.Stats().Executions != before {
		return []string{fmt.Sprintf("after the restart, a retry of %s was not replayed: got %v (replayed %t), first execution made %v", first.Key, rc.ChargeIDs(), rc.Replayed, want)}
	}
	return nil
}

// every says "every answer", "every 2nd answer" and so on.
func every(n int, noun string) string {
	if n == 1 {
		return "every " + noun
	}
	suffix := "th"
	switch {
	case n%100 >= 11 && n%100 <= 13:
	case n%10 == 1:
		suffix = "st"
	case n%10 == 2:
		suffix = "nd"
	case n%10 == 3:
		suffix = "rd"
	}
	return fmt.Sprintf("every %d%s %s", n, suffix, noun)
}
