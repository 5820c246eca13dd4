package pgstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/grpcidem/idempotency"
)

// Health pings PostgreSQL: it fails while the database cannot be reached,
// and says so once the store is closed.
func TestHealth(t *testing.T) {
	px := newDelayProxy(t)
	pool := newPool(t, func(c *pgxpool.Config) { px.via(c) })
	store := newStore(t, pool, newTable(t, newPool(t, nil)))
	var hc idempotency.HealthChecker = store

	if err := hc.Health(t.Context()); err != nil {
		t.Fatalf("Health of a reachable database: %v", err)
	}
	px.close()
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	if err := hc.Health(ctx); err == nil {
		t.Fatal("Health is nil while the database cannot be reached")
	}
	store.Close()
	if err := hc.Health(t.Context()); !errors.Is(err, idempotency.ErrClosed) {
		t.Fatalf("Health of a closed store: %v, want ErrClosed", err)
	}
}
