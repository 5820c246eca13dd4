package pgstore_test

import (
	"testing"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/pgstore"
	"github.com/grpcidem/idempotency/storetest"
)

// TestConformance runs the shared Store suite. Every store the suite opens is
// a separate Store (its own listener) on one table, as replicas are.
func TestConformance(t *testing.T) {
	pool := newPool(t, nil)
	table := newTable(t, pool)
	newStore(t, pool, table) // migrates the table
	storetest.Run(t, func(t *testing.T) idempotency.Store {
		s, err := pgstore.New(t.Context(), pool, pgstore.WithTable(table))
		if err != nil {
			t.Fatalf("pgstore.New: %v", err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}, storetest.SharedBackend())
}
