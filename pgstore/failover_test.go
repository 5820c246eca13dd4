package pgstore_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/pgstore"
)

// logRecorder is a slog handler that keeps the messages logged, so that a
// test can wait for one.
type logRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	r.msgs = append(r.msgs, rec.Message)
	r.mu.Unlock()
	return nil
}
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *logRecorder) WithGroup(string) slog.Handler      { return r }

func (r *logRecorder) all() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.msgs...)
}

func (r *logRecorder) count(substr string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.msgs {
		if strings.Contains(m, substr) {
			n++
		}
	}
	return n
}

// failoverResult is what one failover run measured.
type failoverResult struct {
	calls, answered, refused int
	lost                     int // answered keys whose replay ran the handler again
	twice                    int // keys whose effect happened twice
	outage                   time.Duration
	rate                     float64 // answered calls per second before the crash
}

func (r failoverResult) String() string {
	return fmt.Sprintf("%d calls, %d answered, %d failed; %.0f answers/s before the crash, outage %v; answered keys lost %d, keys executed twice %d",
		r.calls, r.answered, r.refused, r.rate, r.outage.Round(time.Millisecond), r.lost, r.twice)
}

// TestFailover runs the store on a primary and a streaming standby, on the
// multi-host DSN failoverDSN, behind real gRPC with the interceptors, while
// 8 callers make first executions (half in plain mode, half writing a
// business row in the call's transaction). Under that load the primary is
// stopped at once (pg_ctl stop -m immediate) and the standby promoted; the
// callers go on until the store answers again through the new primary.
// Then every key is called again: an answered key must replay its answer
// without running the handler (else it is lost), a failed call's retry must
// run once, and no key's effect may happen twice (plain mode: the handler
// ran twice; transactional mode: two business rows). Calls whose handlers
// run across the failover, and their waiting duplicates, must get one
// answer; and a waiter must then be woken by a notification through the
// new primary.
//
// With a synchronous standby (synchronous_commit=on) nothing may be lost or
// run twice, with the promotion at once or seconds later, within the store
// timeout. With an asynchronous one, commits answered before the standby
// received them are lost with the primary, and with a store timeout shorter
// than the failover, records of calls in flight are not saved: those runs
// measure how many keys it costs (see the README's "Topologies and
// failover").
func TestFailover(t *testing.T) {
	for _, tc := range []failoverCase{
		{name: "synchronous", synchronous: true},
		{name: "synchronous_5ms", synchronous: true, delay: 5 * time.Millisecond},
		// A failover manager takes seconds to promote: a Complete in
		// flight is retried for the store timeout (10 s by default),
		// long enough to land on the new primary.
		{name: "synchronous_slow_promotion", synchronous: true, promoteAfter: 2 * time.Second},
		// With a store timeout shorter than the failover, the calls in
		// flight are answered with their records unsaved, and run again.
		{name: "synchronous_slow_promotion_1s_store_timeout", synchronous: true, promoteAfter: 2 * time.Second,
			storeTimeout: time.Second, measure: true},
		{name: "asynchronous", measure: true},
		{name: "asynchronous_5ms", delay: 5 * time.Millisecond, measure: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := failoverRun(t, tc)
			if tc.measure {
				t.Logf("%v (the window, measured, not asserted): %v", tc, r)
				return
			}
			t.Logf("%v: %v", tc, r)
			if r.lost != 0 || r.twice != 0 {
				t.Fatalf("%v: %d answered keys lost, %d keys executed twice; want 0 and 0", tc, r.lost, r.twice)
			}
		})
	}
}

type failoverCase struct {
	name         string
	synchronous  bool          // a synchronous standby, else an asynchronous one
	delay        time.Duration // of the replication link, each way
	promoteAfter time.Duration // from the primary's crash to the promotion
	storeTimeout time.Duration // the servers' WithStoreTimeout; zero: the default
	measure      bool          // report lost and twice, but do not require them to be 0
}

func (c failoverCase) String() string {
	kind := "asynchronous"
	if c.synchronous {
		kind = "synchronous"
	}
	storeTimeout := c.storeTimeout
	if storeTimeout == 0 {
		storeTimeout = idempotency.DefaultStoreTimeout
	}
	return fmt.Sprintf("%s standby, replication delay %v, promoted %v after the crash, store timeout %v",
		kind, c.delay, c.promoteAfter, storeTimeout)
}

func failoverRun(t *testing.T, tc failoverCase) failoverResult {
	const (
		callers = 8
		lease   = 2 * time.Second // a key left pending by the failover runs again soon, so its replay finds out
		warmup  = 300             // answered calls before the crash
		after   = 300             // answered calls after the store is back
	)
	pair := startPair(t, tc.synchronous, tc.delay)
	cfg, err := pgxpool.ParseConfig(failoverDSN)
	if err != nil {
		t.Fatal(err)
	}
	cfg.MaxConns = 10
	ctx := t.Context()
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	logs := &logRecorder{}
	store, err := pgstore.New(ctx, pool, pgstore.WithSweepInterval(0),
		// Waiters must be woken by notifications, not by their recheck.
		pgstore.WithRecheckInterval(time.Minute),
		pgstore.WithLogger(slog.New(logs)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	if err := store.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	serverOpts := []idempotency.Option{idempotency.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}
	if tc.storeTimeout > 0 {
		serverOpts = append(serverOpts, idempotency.WithStoreTimeout(tc.storeTimeout))
	}
	plain := &faultPayments{store: store}
	tx := &faultPayments{store: store, tx: true, biz: newBusiness(t, pool)}
	type caller func(ctx context.Context, k string, opts ...grpc.CallOption) callResult
	clients := map[*faultPayments]caller{}
	// Servers whose leases last a minute, like the recheck interval: a
	// duplicate waiting on them is woken in time only by a notification
	// (or the listening connection's reconnection).
	longClients := map[*faultPayments]caller{}
	client := func(svc *faultPayments, lease time.Duration) caller {
		c := bufService(t, store, svc, append([]idempotency.Option{idempotency.WithLease(lease)}, serverOpts...)...)
		return func(ctx context.Context, k string, opts ...grpc.CallOption) callResult {
			return charge(ctx, c, k, opts...)
		}
	}
	for _, svc := range []*faultPayments{plain, tx} {
		clients[svc], longClients[svc] = client(svc, lease), client(svc, time.Minute)
	}

	// Calls whose handlers run across the failover: each holds its key
	// from before the crash until the standby is promoted, with a
	// duplicate waiting for it meanwhile. Both must be answered with one
	// execution's answer; in transactional mode the first execution's
	// transaction dies with the primary, so the caller's retry, or the
	// duplicate, runs it again, and it commits once.
	promotedCh := make(chan struct{})
	spans := map[string]*faultPayments{}
	for i := range 4 {
		svc := plain
		if i%2 == 1 {
			svc = tx
		}
		spans[idempotency.NewKey()] = svc
	}
	spanEntered := make(chan struct{}, len(spans))
	for _, svc := range []*faultPayments{plain, tx} {
		svc.setHook(func(ctx context.Context, key string) error {
			if spans[key] == svc && svc.runsOf(key) == 1 {
				spanEntered <- struct{}{}
				select {
				case <-promotedCh:
				case <-ctx.Done():
				}
			}
			return nil
		})
	}
	type spanResult struct {
		k           string
		first, dupe callResult
	}
	spanResults := make(chan spanResult, len(spans))
	for k, svc := range spans {
		go func() {
			// Retries through the failover; the wait for a running
			// key is bounded by the context.
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			retries := idempotency.WithMaxAttempts(100)
			first := make(chan callResult, 1)
			go func() { first <- longClients[svc](sctx, k, retries) }()
			for svc.runsOf(k) == 0 && sctx.Err() == nil {
				time.Sleep(time.Millisecond)
			}
			dupe := longClients[svc](sctx, k, retries)
			spanResults <- spanResult{k, <-first, dupe}
		}()
	}
	for range spans {
		select {
		case <-spanEntered:
		case r := <-spanResults:
			t.Fatalf("a call meant to run across the failover ended before it: %v, its duplicate %v", r.first.err, r.dupe.err)
		case <-time.After(30 * time.Second):
			t.Fatal("the calls meant to run across the failover did not start")
		}
	}

	var (
		mu       sync.Mutex
		answered = map[string]string{} // key -> the charge answered
		owner    = map[string]*faultPayments{}
		refused  []string
		failed   = map[codes.Code]int{}
		ok       atomic.Int64
		calls    atomic.Int64
		crashed  atomic.Bool
		backAt   atomic.Int64 // answered calls at the promotion
		firstOK  atomic.Int64 // unix nanos of the first answer to a call begun after the crash
		crashAt  time.Time
		stop     = make(chan struct{})
	)
	var wg sync.WaitGroup
	loadStart := time.Now()
	for i := range callers {
		svc := plain
		if i%2 == 1 {
			svc = tx
		}
		call := clients[svc]
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				k := idempotency.NewKey()
				began := crashed.Load()
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				var r callResult
				func() {
					defer cancel()
					// One attempt: a failed call is counted
					// as failed, and retried below.
					r = call(cctx, k, idempotency.WithMaxAttempts(1))
				}()
				calls.Add(1)
				mu.Lock()
				owner[k] = svc
				if r.err == nil {
					answered[k] = r.resp.ChargeId
					ok.Add(1)
					if began {
						firstOK.CompareAndSwap(0, time.Now().UnixNano())
					}
				} else {
					refused = append(refused, k)
					failed[status.Code(r.err)]++
				}
				mu.Unlock()
				if r.err != nil {
					time.Sleep(10 * time.Millisecond) // while no server takes writes
				}
			}
		})
	}
	var stopped bool
	waitFor := func(what string, d time.Duration, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(d)
		for !cond() {
			if time.Now().After(deadline) {
				if !stopped {
					close(stop)
					wg.Wait()
				}
				t.Fatalf("%s: not within %v (%d calls, %d answered); the store logged: %q", what, d, calls.Load(), ok.Load(), logs.all())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor("warm-up", 30*time.Second, func() bool { return ok.Load() >= warmup })
	rate := float64(ok.Load()) / time.Since(loadStart).Seconds()
	cutOff := pair.crashPrimary()
	crashAt = time.Now()
	crashed.Store(true)
	time.Sleep(tc.promoteAfter)
	pair.promote()
	promoted := time.Since(crashAt)
	close(promotedCh)
	backAt.Store(ok.Load())
	waitFor("answers after the failover", 30*time.Second, func() bool {
		return firstOK.Load() != 0 && ok.Load() >= backAt.Load()+after
	})
	close(stop)
	wg.Wait()
	stopped = true

	res := failoverResult{calls: int(calls.Load()), answered: len(answered), refused: len(refused), rate: rate,
		outage: time.Unix(0, firstOK.Load()).Sub(crashAt)}
	if cutOff > 0 {
		t.Logf("the primary ran for %v after its replication link was cut", cutOff.Round(time.Millisecond))
	}
	t.Logf("primary crashed, standby promoted after %v; failed calls by code: %v", promoted.Round(time.Millisecond), failed)
	if res.refused == 0 {
		t.Fatal("no call failed: the crash missed the load")
	}

	// Every key again, 8 at a time, with the client's retries.
	type check struct {
		k   string
		svc *faultPayments
		id  string // the answer, if it was answered
	}
	checks := make(chan check)
	var cmu sync.Mutex
	var errs []string
	for range callers {
		wg.Go(func() {
			for c := range checks {
				before := c.svc.runsOf(c.k)
				rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				r := clients[c.svc](rctx, c.k)
				cancel()
				cmu.Lock()
				switch {
				case r.err != nil:
					errs = append(errs, fmt.Sprintf("key %s again: %v", c.k, r.err))
				case c.id != "" && (!r.replayed || r.resp.ChargeId != c.id):
					if c.svc.runsOf(c.k) > before {
						res.lost++
					} else {
						errs = append(errs, fmt.Sprintf("answered key %s: replayed %v, charge %s, want the replay of %s", c.k, r.replayed, r.resp.ChargeId, c.id))
					}
				}
				cmu.Unlock()
			}
		})
	}
	for k, id := range answered {
		checks <- check{k, owner[k], id}
	}
	for _, k := range refused {
		checks <- check{k, owner[k], ""}
	}
	close(checks)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d keys misbehaved after the failover, such as: %s", len(errs), strings.Join(errs[:min(5, len(errs))], "; "))
	}
	for k, svc := range owner {
		if svc == plain && plain.runsOf(k) > 1 {
			res.twice++
		}
	}
	var twiceTx int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM (SELECT idem_key FROM `+tx.biz.ident()+
		` GROUP BY idem_key HAVING count(*) > 1) dup`).Scan(&twiceTx); err != nil {
		t.Fatal(err)
	}
	res.twice += twiceTx
	var noEffect int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM unnest($1::text[]) AS k(key) WHERE NOT EXISTS
		(SELECT FROM `+tx.biz.ident()+` b WHERE b.idem_key = k.key)`, txKeys(owner, tx)).Scan(&noEffect); err != nil {
		t.Fatal(err)
	}
	if noEffect != 0 {
		t.Fatalf("%d transactional keys have no business row after their call and its replay or retry", noEffect)
	}

	// The calls that ran across the failover, and their duplicates.
	for range spans {
		var r spanResult
		select {
		case r = <-spanResults:
		case <-time.After(40 * time.Second):
			t.Fatal("a call running across the failover, or its waiting duplicate, did not end")
		}
		svc := spans[r.k]
		if r.first.err != nil || r.dupe.err != nil || r.first.resp.ChargeId != r.dupe.resp.ChargeId {
			t.Fatalf("key %s, running across the failover: the call %v, its duplicate %v (charges %s and %s): want one answer for both",
				r.k, r.first.err, r.dupe.err, r.first.resp.GetChargeId(), r.dupe.resp.GetChargeId())
		}
		mode := "plain"
		if svc == tx {
			mode = "transactional"
		}
		t.Logf("%s call across the failover: %d attempts (replayed %v), its duplicate %d (replayed %v); the handler ran %d times",
			mode, r.first.attempts, r.first.replayed, r.dupe.attempts, r.dupe.replayed, svc.runsOf(r.k))
		switch {
		case svc == plain && plain.runsOf(r.k) != 1:
			t.Fatalf("key %s, running across the failover: the handler ran %d times", r.k, plain.runsOf(r.k))
		case svc == tx && tx.biz.rows(t, r.k) != 1:
			t.Fatalf("key %s, running across the failover in transactional mode: %d business rows, want 1", r.k, tx.biz.rows(t, r.k))
		}
	}

	// The listening connection follows the failover: a duplicate waiting
	// for a running call is woken by the notification of its Complete,
	// sent and heard through the new primary, well before its recheck
	// and its lease (a minute each).
	waitFor("the listening connection restored", 15*time.Second, func() bool {
		return logs.count("listening connection restored") > 0
	})
	k := idempotency.NewKey()
	entered, release := make(chan struct{}), make(chan struct{})
	plain.setHook(func(ctx context.Context, key string) error {
		if key == k {
			close(entered)
			<-release
		}
		return nil
	})
	first := make(chan callResult, 1)
	go func() { first <- longClients[plain](ctx, k) }()
	<-entered
	dup := make(chan callResult, 1)
	go func() { dup <- longClients[plain](ctx, k) }()
	time.Sleep(200 * time.Millisecond) // the duplicate is waiting
	close(release)
	r1 := <-first
	start := time.Now()
	select {
	case r2 := <-dup:
		if r1.err != nil || r2.err != nil || !r2.replayed || r2.resp.ChargeId != r1.resp.ChargeId {
			t.Fatalf("after the failover, a call %v and its waiting duplicate %v (replayed %v)", r1.err, r2.err, r2.replayed)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("a duplicate waiting after the failover was not woken within 5s of the first call's answer (lease and recheck 1m)")
	}
	t.Logf("waiting duplicate woken %v after the first call's answer", time.Since(start).Round(time.Millisecond))
	return res
}

// txKeys returns the keys of owner called on svc.
func txKeys(owner map[string]*faultPayments, svc *faultPayments) []string {
	var keys []string
	for k, s := range owner {
		if s == svc {
			keys = append(keys, k)
		}
	}
	return keys
}
