package memstore_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/grpcidem/idempotency"

	"github.com/grpcidem/idempotency/memstore"
)

func TestMemoryStoreIsBounded(t *testing.T) {
	const bound = 640 // 10 per shard
	s := memstore.New(memstore.WithMaxRecords(bound))
	defer s.Close()
	ctx := context.Background()
	for i := range 20_000 {
		key := "k" + strconv.Itoa(i)
		e, err := s.Reserve(ctx, key, idempotency.Claim{Token: "t", Lease: time.Minute})
		require.NoError(t, err)
		require.Equal(t, idempotency.Acquired, e.State)
		require.NoError(t, s.Complete(ctx, key, "t", []byte("record"), time.Hour))
	}
	assert.LessOrEqual(t, s.Len(), bound, "the oldest records are dropped past the bound")
	assert.Greater(t, s.Len(), bound/2)
	e, err := s.Lookup(ctx, "k19999")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Completed, e.State, "the newest record is kept")
	e, err = s.Lookup(ctx, "k0")
	require.NoError(t, err)
	assert.Equal(t, idempotency.Absent, e.State, "the oldest record was dropped")
}

// TestMemoryStoreDropsExpiredFirst: past its bound, the store drops expired
// records before live ones, however old the live ones are.
func TestMemoryStoreDropsExpiredFirst(t *testing.T) {
	const bound = 6400
	s := memstore.New(memstore.WithMaxRecords(bound))
	defer s.Close()
	ctx := context.Background()
	put := func(key string, retention time.Duration) {
		e, err := s.Reserve(ctx, key, idempotency.Claim{Token: "t", Lease: time.Minute})
		require.NoError(t, err)
		require.Equal(t, idempotency.Acquired, e.State, key)
		require.NoError(t, s.Complete(ctx, key, "t", []byte("record"), retention))
	}
	for i := range 3200 {
		put("live"+strconv.Itoa(i), time.Hour)
	}
	for i := range 12_800 {
		put("brief"+strconv.Itoa(i), time.Millisecond)
	}
	kept := 0
	for i := range 3200 {
		e, err := s.Lookup(ctx, "live"+strconv.Itoa(i))
		require.NoError(t, err)
		if e.State == idempotency.Completed {
			kept++
		}
	}
	assert.Equal(t, 3200, kept, "every live record is kept while expired ones can go")
	assert.Less(t, s.Len(), 3200+1000, "expired records are dropped, not kept")
}
