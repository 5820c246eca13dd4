package pgstore_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/pgstore"
)

// pausingStore is a replica's store whose process pauses (a stop-the-world
// pause, a frozen VM) while it renews leases: while paused, Renew blocks,
// whatever its context says; on resume, the renewal goes out at once. Each
// Renew's result is reported on renewed, when there is room.
type pausingStore struct {
	*pgstore.Store
	mu      sync.Mutex
	resume  chan struct{}
	renewed chan error
}

func newPausingStore(t *testing.T, s *pgstore.Store) *pausingStore {
	p := &pausingStore{Store: s, renewed: make(chan error, 64)}
	t.Cleanup(p.unpause) // a Renew still blocked must not outlive the test
	return p
}

func (p *pausingStore) pause() {
	p.mu.Lock()
	if p.resume == nil {
		p.resume = make(chan struct{})
	}
	p.mu.Unlock()
}

func (p *pausingStore) unpause() {
	p.mu.Lock()
	if p.resume != nil {
		close(p.resume)
		p.resume = nil
	}
	p.mu.Unlock()
}

func (p *pausingStore) Renew(ctx context.Context, key string, claim idempotency.Claim) error {
	p.mu.Lock()
	resume := p.resume
	p.mu.Unlock()
	if resume != nil {
		<-resume
		// The process resumes: the renewal it was about to send goes
		// out now, with the time it had left when it stopped.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
	}
	err := p.Store.Renew(ctx, key, claim)
	select {
	case p.renewed <- err:
	default:
	}
	return err
}

// TestLeaseLostToAnotherReplica: replica A's process pauses while it renews
// the lease of a running handler (its Renew blocks for longer than the 1 s
// lease). A duplicate through replica B, on the same table, waits the lease
// out and takes the key. When A resumes, its renewal finds the key B's: A's
// handler sees its context cancelled with context.Cause ==
// idempotency.ErrLeaseLost, and Execution.Err says so too; A's handler
// answers anyway, but its Complete stores nothing, and B's outcome is the
// one every later duplicate gets. Before, the renewal's ErrNotOwner was
// only logged: A's handler ran on, unaware.
func TestLeaseLostToAnotherReplica(t *testing.T) {
	_, table, storeA := setup(t)
	storeB := newStore(t, newPool(t, nil), table)
	a := newPausingStore(t, storeA)
	svcA, svcB := &faultPayments{store: storeA}, &faultPayments{store: storeB}
	clientA := bufService(t, a, svcA, idempotency.WithLease(time.Second))
	clientB := bufService(t, storeB, svcB, idempotency.WithLease(time.Second))
	ctx := t.Context()
	k := idempotency.NewKey()

	aStarted := make(chan *idempotency.Execution, 1)
	aCause := make(chan error, 1)
	svcA.setHook(func(ctx context.Context, _ string) error {
		aStarted <- idempotency.ExecutionFromContext(ctx)
		select {
		case <-ctx.Done():
		case <-time.After(10 * time.Second):
		}
		aCause <- context.Cause(ctx)
		return nil // it answers all the same: its record must not land
	})
	bStarted, bGo := make(chan string, 1), make(chan struct{})
	svcB.setHook(func(ctx context.Context, _ string) error {
		bStarted <- idempotency.ExecutionFromContext(ctx).Token
		<-bGo
		return nil
	})

	a.pause()
	aDone := make(chan callResult, 1)
	go func() { aDone <- charge(ctx, clientA, k, idempotency.WithMaxAttempts(1)) }()
	execA := <-aStarted
	bDone := make(chan callResult, 1)
	go func() { bDone <- charge(ctx, clientB, k, idempotency.WithMaxAttempts(1)) }()
	var tokB string
	select {
	case tokB = <-bStarted:
	case <-time.After(20 * time.Second):
		t.Fatal("the duplicate on replica B never took the key over after A's lease ran out")
	}

	a.unpause() // A resumes; its renewal goes out
	if err := <-a.renewed; !errors.Is(err, idempotency.ErrNotOwner) {
		t.Fatalf("A's renewal after B took the key: %v, want ErrNotOwner", err)
	}
	if cause := <-aCause; !errors.Is(cause, idempotency.ErrLeaseLost) {
		t.Fatalf("A's handler context: cause %v, want ErrLeaseLost", cause)
	}
	if err := execA.Err(); !errors.Is(err, idempotency.ErrLeaseLost) {
		t.Fatalf("A's Execution.Err: %v, want ErrLeaseLost", err)
	}
	ra := <-aDone
	if e, err := storeA.Lookup(ctx, idempotency.StoreKey("", k)); err != nil || e.State != idempotency.Pending || e.Token != tokB {
		t.Fatalf("after A's handler answered: %+v, %v; want the key still pending under B", e, err)
	}

	close(bGo)
	rb := <-bDone
	if rb.err != nil || rb.replayed {
		t.Fatalf("B's call: %v, replayed %v; want its own execution stored", rb.err, rb.replayed)
	}
	for name, client := range map[string]testpb.PaymentServiceClient{"A": clientA, "B": clientB} {
		r := charge(ctx, client, k, idempotency.WithMaxAttempts(1))
		if r.err != nil || !r.replayed || r.resp.ChargeId != rb.resp.ChargeId {
			t.Fatalf("duplicate on %s: %v, replayed %v, charge %s; want B's %s (A answered %s)", name, r.err, r.replayed, r.resp.GetChargeId(), rb.resp.ChargeId, ra.resp.GetChargeId())
		}
	}
}

// TestLapsedLeaseTakenBack: replica A's process pauses while it renews its
// handler's lease, for longer than the lease, and nobody takes the key
// meanwhile; its row expires, and in one variant the sweeper deletes it.
// When A resumes, its renewal takes the key back: the handler is not
// cancelled, a duplicate through replica B now waits for it instead of
// running, and the handler ran once. Before, the renewal of a swept key
// failed with ErrNotOwner: the interceptor stopped renewing (and now would
// cancel the handler), and the duplicate ran the call a second time.
func TestLapsedLeaseTakenBack(t *testing.T) {
	for _, swept := range []bool{false, true} {
		name := "expired row"
		if swept {
			name = "swept row"
		}
		t.Run(name, func(t *testing.T) {
			pool, table, store := setup(t)
			storeB := newStore(t, pool, table)
			a := newPausingStore(t, store)
			svcA, svcB := &faultPayments{store: store}, &faultPayments{store: storeB}
			clientA := bufService(t, a, svcA, idempotency.WithLease(time.Second))
			clientB := bufService(t, storeB, svcB, idempotency.WithLease(time.Second))
			ctx := t.Context()
			k := idempotency.NewKey()
			sk := idempotency.StoreKey("", k)

			started := make(chan *idempotency.Execution, 1)
			proceed := make(chan struct{})
			handlerCause := make(chan error, 1)
			svcA.setHook(func(ctx context.Context, _ string) error {
				started <- idempotency.ExecutionFromContext(ctx)
				<-proceed
				handlerCause <- context.Cause(ctx)
				return nil
			})

			a.pause()
			aDone := make(chan callResult, 1)
			go func() { aDone <- charge(ctx, clientA, k, idempotency.WithMaxAttempts(1)) }()
			exec := <-started
			// The lease runs out, by the database's clock, with nobody
			// taking the key.
			deadline := time.Now().Add(20 * time.Second)
			for {
				e, err := store.Lookup(ctx, sk)
				if err != nil {
					t.Fatal(err)
				}
				if e.State == idempotency.Absent {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the lease never ran out: %+v", e)
				}
				time.Sleep(20 * time.Millisecond)
			}
			if swept {
				if _, err := store.Sweep(ctx); err != nil {
					t.Fatal(err)
				}
				var n int
				pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{table}.Sanitize()+` WHERE key = $1`, []byte(sk)).Scan(&n)
				if n != 0 {
					t.Fatalf("%d rows for the key after the sweep, want 0", n)
				}
			}

			a.unpause()
			if err := <-a.renewed; err != nil {
				// Go on: what follows shows what that costs.
				t.Errorf("the renewal of a lapsed lease nobody took: %v, want nil (taken back)", err)
			}
			bDone := make(chan callResult, 1)
			go func() { bDone <- charge(ctx, clientB, k, idempotency.WithMaxAttempts(1)) }()
			time.Sleep(200 * time.Millisecond) // let B find the key held; correct either way
			close(proceed)

			ra := <-aDone
			if ra.err != nil || ra.replayed {
				t.Fatalf("A's call: %v, replayed %v", ra.err, ra.replayed)
			}
			if cause := <-handlerCause; cause != nil || exec.Err() != nil {
				t.Fatalf("A's handler context ended (%v; Execution.Err %v) though nobody took its key", cause, exec.Err())
			}
			rb := <-bDone
			if rb.err != nil || !rb.replayed || rb.resp.ChargeId != ra.resp.ChargeId {
				t.Fatalf("the duplicate on B: %v, replayed %v, charge %s; want the replay of %s", rb.err, rb.replayed, rb.resp.GetChargeId(), ra.resp.ChargeId)
			}
			if n, m := svcA.runsOf(k), svcB.runsOf(k); n != 1 || m != 0 {
				t.Fatalf("the handler ran %d times on A and %d on B, want once in all", n, m)
			}
		})
	}
}
