package boltstore_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	bolt "go.etcd.io/bbolt"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/boltstore"
)

// openStore opens a store on path that the test closes, and checks the
// file's consistency afterwards, as bbolt's own tests do.
func openStore(t *testing.T, path string, opts ...boltstore.Option) *boltstore.Store {
	t.Helper()
	s, err := boltstore.Open(path, opts...)
	require.NoError(t, err)
	t.Cleanup(func() {
		s.Close()
		db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
		require.NoError(t, err)
		defer db.Close()
		require.NoError(t, db.View(func(tx *bolt.Tx) error {
			for err := range tx.Check() {
				t.Errorf("bbolt consistency check of %s: %v", path, err)
			}
			return nil
		}))
	})
	return s
}

func TestBoltGroupCommit(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "idem.db"))
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

// TestBoltSecondProcessFailsFast opens the file in this process, then runs
// this test binary again as a second process that opens it too: the second
// must fail with ErrLocked within its lock timeout, not hang.
func TestBoltSecondProcessFailsFast(t *testing.T) {
	if path := os.Getenv("IDEMPOTENCY_SECOND_PROCESS_DB"); path != "" {
		_, err := boltstore.Open(path, boltstore.WithLockTimeout(300*time.Millisecond))
		if errors.Is(err, boltstore.ErrLocked) {
			os.Stdout.WriteString("LOCKED: " + err.Error() + "\n")
			return
		}
		t.Fatalf("second process: want ErrLocked, got %v", err)
	}
	path := filepath.Join(t.TempDir(), "idem.db")
	openStore(t, path)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestBoltSecondProcessFailsFast$", "-test.count=1")
	cmd.Env = append(os.Environ(), "IDEMPOTENCY_SECOND_PROCESS_DB="+path)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "second process: %s", out)
	assert.Contains(t, string(out), "LOCKED: ")
	assert.Contains(t, string(out), path, "the error names the file")
	assert.Contains(t, string(out), "another process")
}

func TestBoltForgetAndRecords(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "idem.db"))
	ctx := context.Background()
	for _, k := range []string{"b", "a", "c"} {
		_, err := s.Reserve(ctx, k, idempotency.Claim{Token: "t", Lease: time.Minute})
		require.NoError(t, err)
		require.NoError(t, s.Complete(ctx, k, "t", []byte("rec-"+k), time.Hour))
	}
	_, err := s.Reserve(ctx, "running", idempotency.Claim{Token: "t", Lease: time.Minute})
	require.NoError(t, err)

	var keys []string
	require.NoError(t, s.Records(func(key string, e idempotency.Entry) bool {
		assert.Equal(t, "rec-"+key, string(e.Record))
		keys = append(keys, key)
		return true
	}))
	assert.Equal(t, []string{"a", "b", "c"}, keys, "live records in key order; a pending key has none")

	_, err = s.Forget("running")
	assert.ErrorIs(t, err, boltstore.ErrInProgress)
	found, err := s.Forget("b")
	require.NoError(t, err)
	assert.True(t, found)
	e, err := s.Reserve(ctx, "b", idempotency.Claim{Token: "t2", Lease: time.Minute})
	require.NoError(t, err)
	assert.Equal(t, idempotency.Acquired, e.State, "a forgotten key runs again, even though its record was cached")
	found, err = s.Forget("nothing")
	require.NoError(t, err)
	assert.False(t, found)
}
