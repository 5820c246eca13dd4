package pgstore

import (
	"context"
	"fmt"
	"time"

	"github.com/grpcidem/idempotency"
)

func (s *Store) sweepLoop(ctx context.Context) {
	t := time.NewTicker(s.opts.sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := s.sweep(ctx); err != nil && ctx.Err() == nil {
			s.opts.logger.Warn("pgstore: sweeping expired rows failed", "table", s.table.plain(), "err", err)
		}
	}
}

// Sweep deletes expired rows now, in batches, until a batch comes back short,
// and returns how many it deleted. The background sweeper calls it every
// sweep interval; call it yourself when the sweeper is off. Expired rows act
// as absent whether or not they have been swept: sweeping only frees space.
func (s *Store) Sweep(ctx context.Context) (int64, error) {
	if s.closed.Load() {
		return 0, idempotency.ErrClosed
	}
	return s.sweep(ctx)
}

func (s *Store) sweep(ctx context.Context) (int64, error) {
	var total int64
	for {
		tag, err := s.pool.Exec(ctx, s.sql.sweep, s.opts.sweepBatch)
		if err != nil {
			return total, fmt.Errorf("pgstore: sweep: %w", err)
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < int64(s.opts.sweepBatch) {
			return total, nil
		}
	}
}
