package memstore_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/grpcidem/idempotency"

	"github.com/grpcidem/idempotency/memstore"
)

// A pending key's fingerprint is a copy of its claim's, whatever its length
// (a SHA-256 sum is kept in the lease itself, others apart), and stays nil
// or empty as the claim's was.
func TestPendingFingerprintIsACopy(t *testing.T) {
	s := memstore.New()
	defer s.Close()
	ctx := context.Background()
	for _, n := range []int{-1, 0, 1, 32, 33, 200} {
		var fp []byte
		if n >= 0 {
			fp = make([]byte, n)
			for i := range fp {
				fp[i] = byte(i + 1)
			}
		}
		want := bytes.Clone(fp)
		key := "fp-" + string(rune('a'+n+1))
		e, err := s.Reserve(ctx, key, idempotency.Claim{Token: "owner", Fingerprint: fp, Lease: time.Minute})
		require.NoError(t, err)
		require.Equal(t, idempotency.Acquired, e.State)
		for i := range fp {
			fp[i] = 0xff // the caller's, to change
		}
		e, err = s.Reserve(ctx, key, idempotency.Claim{Token: "other", Lease: time.Minute})
		require.NoError(t, err)
		require.Equal(t, idempotency.Pending, e.State)
		assert.Equal(t, want, e.Fingerprint, "length %d", n)
		assert.Equal(t, want == nil, e.Fingerprint == nil, "length %d: nil stays nil, empty stays empty", n)
	}
}
