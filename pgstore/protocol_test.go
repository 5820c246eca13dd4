package pgstore_test

import (
	"context"
	"encoding/binary"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/pgstore"
)

// wireCounter is a net.Conn that records the type of every message the
// client sends to PostgreSQL (after the startup message, which has none):
// 'P' Parse, 'B' Bind, 'D' Describe, 'E' Execute, 'S' Sync, 'Q' a simple
// query.
type wireCounter struct {
	net.Conn
	log *wireLog
	buf []byte
	// started is set once the startup message, which has no type byte,
	// has gone by.
	started bool
}

type wireLog struct {
	mu    sync.Mutex
	types []byte
}

func (l *wireLog) since(n int) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return string(l.types[n:])
}

func (l *wireLog) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.types)
}

func (c *wireCounter) Write(p []byte) (int, error) {
	c.buf = append(c.buf, p...)
	for {
		if !c.started {
			if len(c.buf) < 4 {
				break
			}
			n := int(binary.BigEndian.Uint32(c.buf))
			if len(c.buf) < n {
				break
			}
			c.buf, c.started = c.buf[n:], true
			continue
		}
		if len(c.buf) < 5 {
			break
		}
		n := 1 + int(binary.BigEndian.Uint32(c.buf[1:]))
		if len(c.buf) < n {
			break
		}
		c.log.mu.Lock()
		c.log.types = append(c.log.types, c.buf[0])
		c.log.mu.Unlock()
		c.buf = c.buf[n:]
	}
	return c.Conn.Write(p)
}

// TestStatementsArePrepared checks what a first execution and a replay send
// on the wire once the store's statements have been used on a connection:
// each store call is one Bind, one Execute and one Sync (one round trip) of a
// statement prepared earlier, never a Parse or a simple query again; and no
// notification is sent when nobody waits.
func TestStatementsArePrepared(t *testing.T) {
	log := &wireLog{}
	pool := newPool(t, func(c *pgxpool.Config) {
		c.MaxConns = 1 // the store's calls share the one connection, and its cache
		dial := c.ConnConfig.DialFunc
		c.ConnConfig.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &wireCounter{Conn: conn, log: log}, nil
		}
	})
	if mode := pool.Config().ConnConfig.DefaultQueryExecMode; mode != pgx.QueryExecModeCacheStatement {
		t.Fatalf("the pool's query exec mode is %v, want the default, QueryExecModeCacheStatement", mode)
	}
	s := newStore(t, pool, newTable(t, pool), pgstore.WithRecheckInterval(time.Hour))
	ctx := t.Context()
	first := func() {
		t.Helper()
		k, tok := key("wire"), token()
		if e, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Minute}); err != nil || e.State != idempotency.Acquired {
			t.Fatalf("Reserve: %v, %v", e.State, err)
		}
		if err := s.Complete(ctx, k, tok, []byte("record"), time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	first() // prepares both statements on the connection
	before := log.len()
	first()
	time.Sleep(100 * time.Millisecond) // a notification would follow the Complete
	got := log.since(before)
	t.Logf("a first execution sent %q", got)
	if strings.ContainsAny(got, "PQ") || strings.Count(got, "S") != 2 || strings.Count(got, "E") != 2 {
		t.Fatalf("a first execution sent %q; want two prepared statements, each Bind, Execute, Sync, and nothing else", got)
	}
}

// TestMigrateAddsWaitersColumn: a table made by an earlier version, without
// the waiters column, is brought up to date by Migrate, and then serves.
func TestMigrateAddsWaitersColumn(t *testing.T) {
	pool := newPool(t, nil)
	table := newTable(t, pool)
	ctx := t.Context()
	_, err := pool.Exec(ctx, `CREATE TABLE `+pgx.Identifier{table}.Sanitize()+` (
    key bytea PRIMARY KEY, completed boolean NOT NULL DEFAULT false, token text NOT NULL,
    fingerprint bytea, record bytea, created_at timestamptz NOT NULL DEFAULT now(), expires_at timestamptz NOT NULL)`)
	if err != nil {
		t.Fatal(err)
	}
	s := newStore(t, pool, table) // runs Migrate
	k, tok := key("old-table"), token()
	if e, err := s.Reserve(ctx, k, idempotency.Claim{Token: tok, Lease: time.Minute}); err != nil || e.State != idempotency.Acquired {
		t.Fatalf("Reserve: %v, %v", e.State, err)
	}
	if err := s.Complete(ctx, k, tok, []byte("record"), time.Hour); err != nil {
		t.Fatalf("Complete on a migrated table: %v", err)
	}
}
