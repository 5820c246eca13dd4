package idempotency_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/grpcidem/idempotency"
	testpb "github.com/grpcidem/idempotency/internal/testpb"
	"github.com/grpcidem/idempotency/internal/tmpfs"
)

// TestBoltFullDisk runs the bbolt store on a small tmpfs and fills it. A first
// execution whose record cannot be written still answers with the handler's
// real outcome, and its key stays held: a duplicate never runs the handler
// again (it waits, then is refused). New first executions are refused with
// Unavailable before their handler runs, replays of stored records still
// work, and once space is freed the store takes first executions again by
// itself.
func TestBoltFullDisk(t *testing.T) {
	dir := tmpfs.Mount(t, "4m")
	store := openBolt(t, filepath.Join(dir, "idem.db"))
	e := newEnv(t, store, envConfig{server: []idempotency.Option{
		idempotency.WithLease(time.Second),
		idempotency.WithStoreTimeout(300 * time.Millisecond),
		idempotency.WithWaitTimeout(3 * time.Second),
		idempotency.WithLogger(nil),
	}})
	ctx := testCtx(t)
	charge := func(key string, account string) (*testpb.ChargeResponse, metadata.MD, error) {
		var header metadata.MD
		resp, err := e.client.Charge(withKey(ctx, key), &testpb.ChargeRequest{Account: account, AmountCents: 100, Currency: "EUR"}, grpc.Header(&header))
		return resp, header, err
	}

	stored, _, err := charge("stored", "acct-stored")
	require.NoError(t, err)

	filler := filepath.Join(dir, "filler")
	tmpfs.Fill(t, filler)

	// Its record (the account echoed in the response) needs pages the full
	// disk cannot give.
	big := strings.Repeat("a", 512<<10)
	_, header, err := charge("unsaved", big)
	require.NoError(t, err, "the caller gets the handler's real outcome, not the store's failure")
	assert.False(t, idempotency.IsReplayed(header))
	require.Equal(t, int64(2), e.svc.execs.Load())

	// A duplicate waits for the held key, then finds the store refusing
	// first executions: never a second execution.
	_, _, err = charge("unsaved", big)
	require.Error(t, err)
	assert.Contains(t, []codes.Code{codes.Aborted, codes.Unavailable}, status.Code(err), "%v", err)
	assert.Equal(t, int64(2), e.svc.execs.Load(), "the duplicate of an answered call ran the handler again")

	// New first executions are refused before their handler runs.
	_, _, err = charge("new", "acct-new")
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
	assert.Contains(t, status.Convert(err).Message(), "cannot take writes")
	assert.Equal(t, int64(2), e.svc.execs.Load(), "a first execution ran on a store that cannot save it")

	// Replays still work.
	again, header, err := charge("stored", "acct-stored")
	require.NoError(t, err)
	assert.True(t, idempotency.IsReplayed(header))
	assert.Equal(t, stored.ChargeId, again.ChargeId)

	// Space comes back: first executions resume by themselves.
	require.NoError(t, os.Remove(filler))
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, header, err := charge("new", "acct-new")
		if err == nil {
			assert.False(t, idempotency.IsReplayed(header))
			assert.NotEmpty(t, resp.ChargeId)
			break
		}
		require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
		require.True(t, time.Now().Before(deadline), "the store did not take writes again after space was freed: %v", err)
		time.Sleep(100 * time.Millisecond)
	}
	assert.Equal(t, int64(3), e.svc.execs.Load())
}
