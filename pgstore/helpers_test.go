package pgstore_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	"github.com/grpcidem/idempotency/pgstore"

	"github.com/grpcidem/idempotency"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const defaultDSN = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

func dsn() string {
	if d := os.Getenv("POSTGRES_DSN"); d != "" {
		return d
	}
	return defaultDSN
}

// newPool connects to the test database, or skips the test when it is
// unreachable (and fails it when CI=true, where the database must be up).
// configure, if not nil, adjusts the pool's configuration first.
func newPool(t testing.TB, configure func(*pgxpool.Config)) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(dsn())
	if err != nil {
		t.Fatalf("POSTGRES_DSN %q: %v", dsn(), err)
	}
	cfg.MaxConns = 16
	if configure != nil {
		configure(cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err == nil {
		err = pool.Ping(ctx)
	}
	if err != nil {
		if pool != nil {
			pool.Close()
		}
		msg := "PostgreSQL unreachable at " + dsn() + " (set POSTGRES_DSN, or start it: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start): " + err.Error()
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	t.Cleanup(pool.Close)
	return pool
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// newTable returns a table name no other run uses, and drops the table when
// the test ends.
func newTable(t testing.TB, pool *pgxpool.Pool) string {
	t.Helper()
	name := "pgstore_test_" + randomHex(6)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := pool.Exec(ctx, "DROP TABLE IF EXISTS "+pgx.Identifier{name}.Sanitize()); err != nil {
			t.Errorf("drop table %s: %v", name, err)
		}
	})
	return name
}

// newStore opens a Store on table (migrated) and closes it when the test
// ends. The sweeper is off unless opts turn it on, so that tests see rows as
// they left them.
func newStore(t testing.TB, pool *pgxpool.Pool, table string, opts ...pgstore.Option) *pgstore.Store {
	t.Helper()
	opts = append([]pgstore.Option{pgstore.WithTable(table), pgstore.WithSweepInterval(0)}, opts...)
	s, err := pgstore.New(t.Context(), pool, opts...)
	if err != nil {
		t.Fatalf("pgstore.New: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	return s
}

// setup is the common case: a pool, a fresh table and one store on it.
func setup(t testing.TB, opts ...pgstore.Option) (*pgxpool.Pool, string, *pgstore.Store) {
	t.Helper()
	pool := newPool(t, nil)
	table := newTable(t, pool)
	return pool, table, newStore(t, pool, table, opts...)
}

// queryCounter is a pgx tracer that counts the queries a pool runs, or,
// with match set, those whose SQL contains it, or, with tagged set, those
// run with a context from counted.
type queryCounter struct {
	match  string
	tagged bool
	n      atomic.Int64
	mu     sync.Mutex
	sql    []string // the first words of each statement counted
}

func (c *queryCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	if strings.Contains(d.SQL, c.match) && (!c.tagged || ctx.Value(countedKey{}) != nil) {
		c.n.Add(1)
		c.mu.Lock()
		c.sql = append(c.sql, strings.Join(strings.Fields(d.SQL)[:min(3, len(strings.Fields(d.SQL)))], " "))
		c.mu.Unlock()
	}
	return ctx
}

type countedKey struct{}

// counted marks ctx for a tagged queryCounter: the store's background work
// (notifications, sweeping) runs on other contexts and is not counted.
func counted(ctx context.Context) context.Context {
	return context.WithValue(ctx, countedKey{}, true)
}

// since returns the statements counted after the first n.
func (c *queryCounter) since(n int64) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.sql[n:]...)
}

func (c *queryCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func token() string { return randomHex(16) }

func key(name string) string { return "pgstore-test/" + randomHex(8) + "/" + name }

// mustServer returns the idempotency server of a test; an option out of range
// is a bug in the test.
func mustServer(store idempotency.Store, opts ...idempotency.Option) *idempotency.Server {
	s, err := idempotency.NewServer(store, opts...)
	if err != nil {
		panic(err)
	}
	return s
}
