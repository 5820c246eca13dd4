package pgstore

import (
	"context"
	"fmt"
	"hash/fnv"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/grpcidem/idempotency"
)

// DefaultTable is the table a Store uses unless WithTable says otherwise.
const DefaultTable = "idempotency_records"

// maxIdentifier is PostgreSQL's identifier limit (NAMEDATALEN-1). Longer
// names are silently truncated by the server, so two long names could end up
// naming one table; they are refused instead.
const maxIdentifier = 63

// indexSuffix names the sweeper's index after its table.
const indexSuffix = "_expires_at_idx"

// Schema returns the SQL that creates the table of a Store using table (a
// name such as "idempotency_records" or "app.idempotency_records"), for teams
// that apply migrations with their own tool. Migrate runs the same SQL. Every
// statement is idempotent (IF NOT EXISTS), so it is safe to run again.
//
// One row per key:
//
//	key          bytea        the store key, binary-safe
//	completed    boolean      false: pending under token; true: record stored
//	token        text         the owner's token (of the completing owner, when completed)
//	fingerprint  bytea        the owner's request fingerprint, when known
//	record       bytea        the stored record (completed rows)
//	created_at   timestamptz  when the lease was taken or the record stored
//	expires_at   timestamptz  pending: end of the lease; completed: end of retention
//	waiters      boolean      a duplicate waits for this lease to end: its end is notified
//
// A Store of this version needs the waiters column: after an upgrade, run
// Migrate (or Schema's SQL) again, which adds it to an existing table.
// A row whose expires_at has passed acts as absent to every operation, swept
// or not. The index on expires_at serves the sweeper; the primary key's
// serves the admin service's listing (Store.ListKeys), a range of keys in
// key order. Every time is the database's clock (now()), never a replica's.
func Schema(table string) (string, error) {
	t, err := parseTable(table)
	if err != nil {
		return "", err
	}
	return t.schema(), nil
}

// tableName is a validated, possibly schema-qualified, table name.
type tableName struct {
	parts []string // [table] or [schema, table]
}

func parseTable(name string) (tableName, error) {
	parts := strings.Split(name, ".")
	if len(parts) > 2 {
		return tableName{}, fmt.Errorf("pgstore: table name %q: at most one dot (schema.table)", name)
	}
	for _, p := range parts {
		if err := checkIdentifier(p); err != nil {
			return tableName{}, fmt.Errorf("pgstore: table name %q: %w", name, err)
		}
	}
	// The index is named after the table and must fit too.
	if n := len(parts[len(parts)-1]) + len(indexSuffix); n > maxIdentifier {
		return tableName{}, fmt.Errorf("pgstore: table name %q: at most %d characters, so that its index name fits",
			name, maxIdentifier-len(indexSuffix))
	}
	return tableName{parts: parts}, nil
}

// checkIdentifier accepts the names that need no thought: letters, digits
// and underscores, not starting with a digit. Names are quoted anyway, so
// case is kept as given.
func checkIdentifier(s string) error {
	if s == "" {
		return fmt.Errorf("empty identifier")
	}
	if len(s) > maxIdentifier {
		return fmt.Errorf("identifier %q longer than %d bytes", s, maxIdentifier)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '_', 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z':
		case '0' <= c && c <= '9' && i > 0:
		default:
			return fmt.Errorf("identifier %q: only letters, digits and underscores, not starting with a digit", s)
		}
	}
	return nil
}

// String returns the quoted name, ready for SQL.
func (t tableName) String() string {
	return pgx.Identifier(t.parts).Sanitize()
}

// plain is the unquoted name as given, used for the default channel.
func (t tableName) plain() string {
	return strings.Join(t.parts, ".")
}

func (t tableName) index() string {
	return pgx.Identifier{t.parts[len(t.parts)-1] + indexSuffix}.Sanitize()
}

// lockID is the advisory lock that serializes concurrent migrations of one
// table: CREATE TABLE IF NOT EXISTS run at once by two replicas can fail on
// the catalog's unique index.
func (t tableName) lockID() int64 {
	h := fnv.New64a()
	h.Write([]byte("pgstore.migrate:" + t.plain()))
	return int64(h.Sum64())
}

func (t tableName) schema() string {
	return fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %[1]s (
    key         bytea       PRIMARY KEY,
    completed   boolean     NOT NULL DEFAULT false,
    token       text        NOT NULL,
    fingerprint bytea,
    record      bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    waiters     boolean     NOT NULL DEFAULT false
);
ALTER TABLE %[1]s ADD COLUMN IF NOT EXISTS waiters boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS %[2]s ON %[1]s (expires_at);
`, t, t.index())
}

// Migrate creates the store's table and index if they do not exist. It is
// safe to call from several replicas at once, and on every start. Teams that
// manage migrations themselves run Schema's SQL instead.
func (s *Store) Migrate(ctx context.Context) error {
	if s.closed.Load() {
		return idempotency.ErrClosed
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", s.table.lockID()); err != nil {
			return err
		}
		// No arguments: pgx sends it with the simple protocol, which
		// runs several statements.
		_, err := tx.Exec(ctx, s.table.schema())
		return err
	})
	if err != nil {
		return fmt.Errorf("pgstore: migrate %s: %w", s.table.plain(), err)
	}
	return nil
}
