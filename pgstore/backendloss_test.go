package pgstore_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/pgstore"
)

// faultPool is a pool whose connections carry application_name app, so that
// killBackends finds them (and no other test's). Connections are never
// pinged before use: a connection killed while idle is found dead by the
// statement that uses it, as it is whenever it dies after the ping.
func faultPool(t *testing.T, app string, configure func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	return newPool(t, func(c *pgxpool.Config) {
		c.MaxConns = 6
		c.ConnConfig.RuntimeParams["application_name"] = app
		c.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return false }
		if configure != nil {
			configure(c)
		}
	})
}

// killBackends terminates every backend of application app, through admin
// (another pool), and waits until they are gone. It returns how many there
// were.
func killBackends(t testing.TB, admin *pgxpool.Pool, app string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var pids []int32
	// pg_terminate_backend is in the select list, so that it runs only on
	// the rows the WHERE clause kept: in a WHERE clause, the planner may
	// call it before the other conditions, on every backend.
	err := admin.QueryRow(ctx, `SELECT coalesce(array_agg(pid) FILTER (WHERE terminated), '{}') FROM (
		SELECT pid, pg_terminate_backend(pid) AS terminated FROM pg_stat_activity
		WHERE application_name = $1 AND pid <> pg_backend_pid()) AS killed`, app).Scan(&pids)
	if err != nil {
		t.Errorf("terminating the backends of %s: %v", app, err)
		return 0
	}
	for {
		var left int
		if err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)`, pids).Scan(&left); err != nil {
			t.Errorf("waiting for the backends of %s to exit: %v", app, err)
			return len(pids)
		}
		if left == 0 {
			return len(pids)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// warmIdle makes the pool hold n idle connections, so that a kill leaves
// dead connections for the next statements to find.
func warmIdle(t testing.TB, pool *pgxpool.Pool, n int) {
	t.Helper()
	var conns []*pgxpool.Conn
	for range n {
		c, err := pool.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	for _, c := range conns {
		c.Release()
	}
}

// countingStore counts the Complete calls that failed, to show that the
// faults of a test did hit Complete.
type countingStore struct {
	*pgstore.Store
	completeFailures atomic.Int64
}

func (c *countingStore) Complete(ctx context.Context, key, token string, record []byte, retention time.Duration) error {
	err := c.Store.Complete(ctx, key, token, record, retention)
	if err != nil {
		c.completeFailures.Add(1)
	}
	return err
}

// TestCompleteSurvivesBackendLoss: every backend of the store's pool is
// terminated at the moment the handler returns, so the statements that save
// its outcome meet dead connections.
//
// Plain mode: the caller gets the handler's real answer, a duplicate replays
// it, and the handler ran once. Before, Complete was tried once; its failure
// left the key held until the lease ran out, and then the duplicate ran the
// handler again.
//
// Transactional mode: the handler's own connection died with its
// transaction, so nothing was committed: the caller gets Aborted, and its
// retry runs again at once (not after a lease) and commits exactly one
// business row. Before, the key's release was tried once and failed on a
// dead connection, so the retry waited for the lease to run out.
func TestCompleteSurvivesBackendLoss(t *testing.T) {
	for _, mode := range []string{"plain", "transactional"} {
		t.Run(mode, func(t *testing.T) {
			const lease = 10 * time.Second
			admin := newPool(t, nil)
			app := "pgstore_test_" + randomHex(6)
			pool := faultPool(t, app, nil)
			store := newStore(t, pool, newTable(t, admin))
			cs := &countingStore{Store: store}
			svc := &faultPayments{store: store, tx: mode == "transactional"}
			if svc.tx {
				svc.biz = newBusiness(t, admin)
			}
			client := bufService(t, cs, svc, idempotency.WithLease(lease))
			ctx := t.Context()
			k := idempotency.NewKey()
			killed := make(chan int, 1)
			svc.setHook(func(ctx context.Context, key string) error {
				if key == k && svc.runsOf(k) == 1 {
					killed <- killBackends(t, admin, app)
				}
				return nil
			})
			warmIdle(t, pool, 3)

			r := charge(ctx, client, k, idempotency.WithMaxAttempts(1))
			select {
			case n := <-killed:
				t.Logf("terminated %d backends as the handler returned", n)
				if n < 2 {
					t.Fatalf("terminated %d backends; want the listener's and the idle ones", n)
				}
			default:
				t.Fatal("the handler's hook did not run")
			}
			if n := cs.completeFailures.Load(); n == 0 {
				t.Fatal("no Complete failed: the fault missed what it tests")
			}

			if !svc.tx {
				if r.err != nil || r.replayed {
					t.Fatalf("the call: %v, replayed %v; want the handler's own answer", r.err, r.replayed)
				}
				if want := svc.answers[k][0]; r.resp.ChargeId != want {
					t.Fatalf("the call answered %s, the handler %s", r.resp.ChargeId, want)
				}
				// The client retries Unavailable, which a Reserve that
				// meets a dead connection gives.
				dctx, cancel := context.WithTimeout(ctx, 2*lease)
				defer cancel()
				dup := charge(dctx, client, k)
				if dup.err != nil || !dup.replayed || dup.resp.ChargeId != r.resp.ChargeId {
					t.Fatalf("duplicate: %v, replayed %v, charge %v; want the replay of %s", dup.err, dup.replayed, dup.resp.GetChargeId(), r.resp.ChargeId)
				}
				if n := svc.runsOf(k); n != 1 {
					t.Fatalf("the handler ran %d times, want 1", n)
				}
				return
			}

			if status.Code(r.err) != codes.Aborted {
				t.Fatalf("the call whose transaction died: %v, want Aborted", r.err)
			}
			if n := svc.biz.rows(t, k); n != 0 {
				t.Fatalf("%d business rows after Aborted, want 0", n)
			}
			start := time.Now()
			rctx, cancel := context.WithTimeout(ctx, lease/2)
			defer cancel()
			retry := charge(rctx, client, k)
			if retry.err != nil || retry.replayed {
				t.Fatalf("the retry after Aborted: %v (after %v), replayed %v; want a fresh execution well within the %v lease",
					retry.err, time.Since(start).Round(time.Millisecond), retry.replayed, lease)
			}
			if n := svc.runsOf(k); n != 2 {
				t.Fatalf("the handler ran %d times, want 2 (the rolled-back one and the retry)", n)
			}
			if n := svc.biz.rows(t, k); n != 1 {
				t.Fatalf("%d business rows, want exactly 1", n)
			}
			again := charge(ctx, client, k, idempotency.WithMaxAttempts(1))
			if again.err != nil || !again.replayed || again.resp.ChargeId != retry.resp.ChargeId {
				t.Fatalf("replay: %v, replayed %v", again.err, again.replayed)
			}
			if n := svc.biz.rows(t, k); n != 1 {
				t.Fatalf("%d business rows after the replay, want 1", n)
			}
		})
	}
}

// TestBackendLossUnderLoad: 8 clients make at least 400 calls, each with a
// fresh key, while every backend of the store's pool is terminated every
// 100 ms (at least 3 times). Calls may fail (Unavailable when a Reserve
// met a dead connection, Aborted when a transaction died); but every key
// that was answered must replay that answer without running again, and in
// transactional mode have exactly one business row. A failed call's retry
// succeeds, and its effect happens once (the failed call never ran, in
// plain mode; its writes were rolled back, in transactional mode). Before,
// a Complete that met a dead connection was not retried: its key was
// answered, but not stored, and ran again on retry.
func TestBackendLossUnderLoad(t *testing.T) {
	for _, mode := range []string{"plain", "transactional"} {
		t.Run(mode, func(t *testing.T) {
			const lease = 2 * time.Second // a key left unsaved runs again soon, so a replay finds it
			admin := newPool(t, nil)
			app := "pgstore_test_" + randomHex(6)
			pool := faultPool(t, app, func(c *pgxpool.Config) { c.MaxConns = 8 })
			store := newStore(t, pool, newTable(t, admin))
			cs := &countingStore{Store: store}
			svc := &faultPayments{store: store, tx: mode == "transactional"}
			if svc.tx {
				svc.biz = newBusiness(t, admin)
			}
			client := bufService(t, cs, svc, idempotency.WithLease(lease))
			ctx := t.Context()

			var (
				mu       sync.Mutex
				answered = map[string]string{}
				failed   = map[codes.Code]int{}
				refused  []string // keys whose call failed
				calls    atomic.Int64
				kills    atomic.Int64
				stop     = make(chan struct{})
				done     = make(chan struct{})
			)
			go func() {
				defer close(done)
				tick := time.NewTicker(100 * time.Millisecond)
				defer tick.Stop()
				for {
					select {
					case <-stop:
						return
					case <-tick.C:
					}
					if killBackends(t, admin, app) > 0 {
						kills.Add(1)
					}
				}
			}()
			var wg sync.WaitGroup
			for range 8 {
				wg.Go(func() {
					for n := calls.Add(1); n <= 400 || (kills.Load() < 3 && n <= 5000); n = calls.Add(1) {
						k := idempotency.NewKey()
						cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
						r := charge(cctx, client, k, idempotency.WithMaxAttempts(1))
						cancel()
						mu.Lock()
						if r.err == nil {
							answered[k] = r.resp.ChargeId
						} else {
							failed[status.Code(r.err)]++
							refused = append(refused, k)
						}
						mu.Unlock()
					}
				})
			}
			wg.Wait()
			close(stop)
			<-done
			t.Logf("%d calls, %d answered, failed: %v; backends terminated %d times; %d Complete attempts failed",
				calls.Load()-8, len(answered), failed, kills.Load(), cs.completeFailures.Load())
			if kills.Load() < 3 {
				t.Fatalf("the backends were terminated %d times during the load, want at least 3", kills.Load())
			}

			ranAgain := 0
			for k, id := range answered {
				rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				r := charge(rctx, client, k)
				cancel()
				if r.err != nil || !r.replayed || r.resp.ChargeId != id {
					t.Errorf("answered key %s: %v, replayed %v, charge %s; want the replay of %s", k, r.err, r.replayed, r.resp.GetChargeId(), id)
				}
				if n := svc.runsOf(k); n != 1 {
					ranAgain++
					t.Errorf("answered key %s: the handler ran %d times", k, n)
				}
			}
			if ranAgain > 0 {
				t.Fatalf("%d of %d answered keys ran again", ranAgain, len(answered))
			}
			// A failed call is retried by its client: it runs, and its
			// effect happens once.
			for _, k := range refused {
				rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				r := charge(rctx, client, k)
				cancel()
				if r.err != nil {
					t.Fatalf("the retry of failed key %s: %v", k, r.err)
				}
				if !svc.tx && svc.runsOf(k) != 1 {
					t.Fatalf("failed key %s: the handler ran %d times in plain mode, want 1 (the failed call never ran it)", k, svc.runsOf(k))
				}
			}
			if svc.tx {
				for _, k := range refused {
					if n := svc.biz.rows(t, k); n != 1 {
						t.Fatalf("failed key %s has %d business rows after its retry, want 1", k, n)
					}
				}
				var bad int
				if err := admin.QueryRow(ctx, `SELECT count(*) FROM (SELECT idem_key FROM `+svc.biz.ident()+
					` GROUP BY idem_key HAVING count(*) > 1) dup`).Scan(&bad); err != nil {
					t.Fatal(err)
				}
				if bad != 0 {
					t.Fatalf("%d keys have more than one business row", bad)
				}
				for k := range answered {
					if n := svc.biz.rows(t, k); n != 1 {
						t.Fatalf("answered key %s has %d business rows, want 1", k, n)
					}
				}
			}
		})
	}
}
