package idempotency_test

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
)

func TestBoltGroupCommit(t *testing.T) {
	s := openBolt(t, filepath.Join(t.TempDir(), "idem.db"))
	ctx := context.Background()
	complete := func(key string) {
		e, err := s.Reserve(ctx, key, idempotency.Claim{Token: "t-" + key, Lease: time.Minute})
		require.NoError(t, err)
		require.Equal(t, idempotency.Acquired, e.State)
		require.NoError(t, s.Complete(ctx, key, "t-"+key, []byte("record "+key), time.Hour))
	}
	for i := range 10 {
		complete("lone-" + strconv.Itoa(i))
	}
	st := s.Stats()
	assert.EqualValues(t, 10, st.Commits, "a lone completion commits at once, on its own")
	assert.EqualValues(t, 10, st.Records)

	// 64 completions at once share commits: while one commit syncs, the
	// others queue for the next.
	const n = 64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		key := "together-" + strconv.Itoa(i)
		e, err := s.Reserve(ctx, key, idempotency.Claim{Token: "t", Lease: time.Minute})
		require.NoError(t, err)
		require.Equal(t, idempotency.Acquired, e.State)
		wg.Go(func() {
			<-start
			assert.NoError(t, s.Complete(ctx, key, "t", []byte("record"), time.Hour))
		})
	}
	close(start)
	wg.Wait()
	st = s.Stats()
	assert.EqualValues(t, 10+n, st.Records, "one record written per first execution")
	assert.Less(t, st.Commits-10, uint64(n), "concurrent completions were group-committed")
	for i := range n {
		e, err := s.Lookup(ctx, "together-"+strconv.Itoa(i))
		require.NoError(t, err)
		assert.Equal(t, idempotency.Completed, e.State)
	}
}
