package pgstore_test

import (
	"bytes"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/pgstore"
)

// The admin listing is a range scan of the primary key's index, in key
// order: no sort, no scan of the table, however large it grows.
func TestListUsesThePrimaryKeyIndex(t *testing.T) {
	pool, table, s := setup(t)
	ctx := t.Context()
	_, err := pool.Exec(ctx, `INSERT INTO `+pgx.Identifier{table}.Sanitize()+` (key, completed, token, record, expires_at)
SELECT convert_to('scope' || (i % 10) || '/key-' || i, 'UTF8'), true, 't', '\x00'::bytea, now() + interval '1 hour'
FROM generate_series(1, 2000) AS i`)
	must(t, err)
	_, err = pool.Exec(ctx, `ANALYZE `+pgx.Identifier{table}.Sanitize())
	must(t, err)

	prefix := idempotency.StoreKey("scope3", "key-1")
	tx, err := pool.Begin(ctx)
	must(t, err)
	defer tx.Rollback(ctx)
	// Whatever the planner would prefer on this small table: can the index
	// serve it alone?
	_, err = tx.Exec(ctx, "SET LOCAL enable_seqscan = off")
	must(t, err)
	_, err = tx.Exec(ctx, "SET LOCAL enable_sort = off")
	must(t, err)
	_, err = tx.Exec(ctx, "SET LOCAL enable_bitmapscan = off")
	must(t, err)
	rows, err := tx.Query(ctx, "EXPLAIN "+s.ListSQL(), []byte(prefix), pgstore.PrefixEnd(prefix), []byte(prefix+"0"), 100)
	must(t, err)
	var plan []string
	for rows.Next() {
		var line string
		must(t, rows.Scan(&line))
		plan = append(plan, line)
	}
	must(t, rows.Err())
	text := strings.Join(plan, "\n")
	if !strings.Contains(text, "Index Scan using "+table+"_pkey") || strings.Contains(text, "Sort") || strings.Contains(text, "Seq Scan") {
		t.Fatalf("the listing is not one range scan of the primary key's index:\n%s", text)
	}

	keys, next, err := s.ListKeys(ctx, prefix, "", 5)
	must(t, err)
	if len(keys) != 5 || keys[0].Key != idempotency.StoreKey("scope3", "key-1003") || next == "" {
		t.Fatalf("ListKeys = %d keys, first %q, next %q; want 5, scope3/key-1003, a next page", len(keys), keys[0].Key, next)
	}
}

func TestPrefixEnd(t *testing.T) {
	for prefix, want := range map[string][]byte{"aa": []byte("ab"), "a\xff\xff": []byte("b"), "\xff\xff": nil, "": nil} {
		if got := pgstore.PrefixEnd(prefix); !bytes.Equal(got, want) || (want == nil) != (got == nil) {
			t.Errorf("PrefixEnd(%q) = %q, want %q", prefix, got, want)
		}
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
