package redisstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/grpcidem/idempotency"
)

// Health pings Redis: it fails while Redis cannot be reached, passes again
// once it can, and says so once the store is closed.
func TestHealth(t *testing.T) {
	admin := newClient(t)
	prefix := testPrefix(t, admin)
	px := startProxy(t, redisAddr(), 0)
	store := newStore(t, proxiedClient(t, px), prefix)
	var hc idempotency.HealthChecker = store

	if err := hc.Health(t.Context()); err != nil {
		t.Fatalf("Health of a reachable Redis: %v", err)
	}
	px.cut(time.Second)
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	if err := hc.Health(ctx); err == nil {
		t.Fatal("Health is nil while Redis cannot be reached")
	}
	deadline := time.Now().Add(10 * time.Second)
	for err := hc.Health(t.Context()); err != nil; err = hc.Health(t.Context()) {
		if time.Now().After(deadline) {
			t.Fatalf("Health still fails after Redis came back: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	store.Close()
	if err := hc.Health(t.Context()); !errors.Is(err, idempotency.ErrClosed) {
		t.Fatalf("Health of a closed store: %v, want ErrClosed", err)
	}
}

// On a Redis Cluster, Health pings every master.
func TestHealthCluster(t *testing.T) {
	store := newStore(t, newClusterClient(t), "health-"+t.Name())
	if err := store.Health(t.Context()); err != nil {
		t.Fatalf("Health of a reachable cluster: %v", err)
	}
}
