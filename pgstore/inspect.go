package pgstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/grpcidem/idempotency"
)

var _ idempotency.Inspector = (*Store)(nil)

// The statements of the Inspector. The listing is a range of the primary
// key, whose B-tree index (bytea compares byte by byte, with no collation)
// serves both the prefix and the order: no other index is needed.
func (s *Store) listSQL() string {
	return fmt.Sprintf(`SELECT key, completed, token, fingerprint, record, expires_at, now() FROM %[1]s
WHERE key >= $1::bytea AND ($2::bytea IS NULL OR key < $2::bytea) AND key > $3::bytea AND expires_at > now()
ORDER BY key LIMIT $4`, s.table)
}

// prefixEnd returns the least key greater than every key that starts with
// prefix, or nil when there is none (prefix is empty or all 0xFF bytes).
func prefixEnd(prefix string) []byte {
	b := []byte(prefix)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] < 0xFF {
			b[i]++
			return b[:i+1]
		}
	}
	return nil
}

// ListKeys implements idempotency.Inspector: pending and completed keys in
// store-key order, one index range scan per page.
func (s *Store) ListKeys(ctx context.Context, prefix, pageToken string, limit int) ([]idempotency.ListedKey, string, error) {
	if s.closed.Load() {
		return nil, "", idempotency.ErrClosed
	}
	if limit < 1 {
		return nil, "", fmt.Errorf("pgstore: ListKeys needs a limit of at least 1, got %d", limit)
	}
	after := ""
	if pageToken != "" {
		var ok bool
		if after, ok = strings.CutPrefix(pageToken, "k"); !ok {
			return nil, "", fmt.Errorf("%w: %q was not made by this store", idempotency.ErrBadPageToken, pageToken)
		}
	}
	sent := time.Now()
	rows, err := s.pool.Query(ctx, s.listSQL(), []byte(prefix), prefixEnd(prefix), []byte(after), limit)
	if err != nil {
		return nil, "", fmt.Errorf("pgstore: list: %w", err)
	}
	var keys []idempotency.ListedKey
	for rows.Next() {
		var (
			key, fingerprint, record []byte
			completed                bool
			token                    string
			expires, dbNow           time.Time
		)
		if err := rows.Scan(&key, &completed, &token, &fingerprint, &record, &expires, &dbNow); err != nil {
			rows.Close()
			return nil, "", fmt.Errorf("pgstore: list: %w", err)
		}
		keys = append(keys, idempotency.ListedKey{Key: string(key), Entry: entry(completed, token, fingerprint, record, localTime(expires, dbNow, sent))})
	}
	if err := rows.Err(); err != nil {
		return nil, "", fmt.Errorf("pgstore: list: %w", err)
	}
	next := ""
	if len(keys) == limit {
		next = "k" + keys[len(keys)-1].Key
	}
	return keys, next, nil
}

func entry(completed bool, token string, fingerprint, record []byte, expires time.Time) idempotency.Entry {
	if completed {
		return idempotency.Entry{State: idempotency.Completed, Record: nonNil(record), Expires: expires}
	}
	return idempotency.Entry{State: idempotency.Pending, Token: token, Fingerprint: fingerprint, LeaseExpires: expires}
}

// ForgetKey implements idempotency.Inspector, in one transaction that locks
// the key's row while it decides. Deleting a pending row wakes its waiters
// on every replica, as Release does.
func (s *Store) ForgetKey(ctx context.Context, key string, force bool) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	if err := idempotency.CheckStoreKey(key); err != nil {
		return idempotency.Entry{}, fmt.Errorf("pgstore: forget: %w", err)
	}
	e := idempotency.Entry{State: idempotency.Absent}
	var refused error
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var (
			fingerprint, record []byte
			completed           bool
			token               string
			expires, dbNow      time.Time
		)
		sent := time.Now()
		err := tx.QueryRow(ctx, fmt.Sprintf(`SELECT completed, token, fingerprint, record, expires_at, now() FROM %s
WHERE key = $1 AND expires_at > now() FOR UPDATE`, s.table), []byte(key)).
			Scan(&completed, &token, &fingerprint, &record, &expires, &dbNow)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return err
		}
		e = entry(completed, token, fingerprint, record, localTime(expires, dbNow, sent))
		if !completed && !force {
			refused = fmt.Errorf("%w: its owner holds the key under a lease until %s", idempotency.ErrInProgress, e.LeaseExpires.UTC().Format(time.RFC3339Nano))
			return nil
		}
		_, err = tx.Exec(ctx, fmt.Sprintf(`DELETE FROM %s WHERE key = $1`, s.table), []byte(key))
		return err
	})
	if err != nil {
		return idempotency.Entry{}, fmt.Errorf("pgstore: forget: %w", err)
	}
	if refused != nil {
		return e, refused
	}
	if e.State == idempotency.Pending {
		s.notifier.add(key)
	}
	return e, nil
}

// Summary implements idempotency.Inspector. Records and Pending are exact,
// counted in one scan of the table; Bytes is the table's size with its
// indexes and TOAST (pg_total_relation_size). Extra has "expired_rows", the
// rows the sweeper has yet to delete.
func (s *Store) Summary(ctx context.Context) (idempotency.StoreSummary, error) {
	if s.closed.Load() {
		return idempotency.StoreSummary{}, idempotency.ErrClosed
	}
	sum := idempotency.StoreSummary{Store: "postgres"}
	var expired int64
	err := s.pool.QueryRow(ctx, fmt.Sprintf(`SELECT
    count(*) FILTER (WHERE completed AND expires_at > now()),
    count(*) FILTER (WHERE NOT completed AND expires_at > now()),
    count(*) FILTER (WHERE expires_at <= now()),
    pg_total_relation_size($1::regclass)
FROM %s`, s.table), s.table.String()).Scan(&sum.Records, &sum.Pending, &expired, &sum.Bytes)
	if err != nil {
		return idempotency.StoreSummary{}, fmt.Errorf("pgstore: stats: %w", err)
	}
	sum.Extra = map[string]int64{"expired_rows": expired}
	return sum, nil
}
