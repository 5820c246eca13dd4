package boltstore_test

import (
	"context"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/boltstore"
)

// The commit observer hears of every group commit, with its size and time,
// as Stats counts them; Health reports a closed store.
func TestCommitObserver(t *testing.T) {
	var mu sync.Mutex
	var commits, records int
	var took time.Duration
	s := openStore(t, filepath.Join(t.TempDir(), "idem.db"), boltstore.WithCommitObserver(func(n int, d time.Duration) {
		mu.Lock()
		commits++
		records += n
		took += d
		mu.Unlock()
	}))
	ctx := context.Background()
	require.NoError(t, s.Health(ctx))
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			key := "k" + strconv.Itoa(i)
			_, err := s.Reserve(ctx, key, idempotency.Claim{Token: "t", Lease: time.Minute})
			assert.NoError(t, err)
			assert.NoError(t, s.Complete(ctx, key, "t", []byte("record"), time.Hour))
		})
	}
	wg.Wait()
	st := s.Stats()
	mu.Lock()
	assert.EqualValues(t, st.Commits, commits)
	assert.EqualValues(t, 32, records)
	assert.EqualValues(t, st.Records, records)
	assert.Positive(t, took)
	mu.Unlock()
	require.NoError(t, s.Close())
	assert.ErrorIs(t, s.Health(ctx), idempotency.ErrClosed)
}
