package idempotency_test

import (
	"context"
	"fmt"
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
	"github.com/grpcidem/idempotency/internal/boltraw"
	testpb "github.com/grpcidem/idempotency/internal/testpb"

	"github.com/grpcidem/idempotency/boltstore"
)

// seedKey is the store key of the i-th seeded record: what the interceptor
// makes of idempotency key k-%04d in the default scope.
func seedKey(i int) string { return idempotency.StoreKey("", fmt.Sprintf("k-%04d", i)) }

// seedBolt completes n records of about 100 bytes on s, enough for the
// records' bucket to span a branch page and many leaf pages.
func seedBolt(t testing.TB, s *boltstore.Store, n int) {
	t.Helper()
	ctx := context.Background()
	for i := range n {
		rec := mustMarshal(t, &idempotency.Record{Method: "/idempotency.testing.v1.PaymentService/Charge", Fingerprint: make([]byte, 80)})
		require.NoError(t, s.Complete(ctx, seedKey(i), "t", rec, time.Hour))
	}
}

// recordLeaves returns the leaf pages of the records' bucket of the closed or
// quiet bbolt file at path, each with its keys, read without bbolt.
func recordLeaves(t testing.TB, path string) (map[uint64][]string, boltraw.Meta) {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	info, err := f.Stat()
	require.NoError(t, err)
	rf, err := boltraw.Open(f, info.Size())
	require.NoError(t, err)
	w := rf.NewWalker()
	var records *boltraw.Bucket
	w.Walk(rf.RootBucket(), func(e boltraw.Elem) bool {
		if string(e.Key) == boltstore.DefaultBucket {
			b, err := boltraw.ParseBucket(e.Value)
			require.NoError(t, err)
			records = &b
		}
		return true
	}, func(p boltraw.Problem) { t.Fatal(p) })
	require.NotNil(t, records)
	require.NotZero(t, records.Root, "the records' bucket has its own pages")
	leaves := map[uint64][]string{}
	w.Pages = func(p *boltraw.Page, depth int) {
		if !p.IsLeaf() {
			return
		}
		elems, _, err := p.Elems()
		require.NoError(t, err)
		for _, e := range elems {
			leaves[p.ID] = append(leaves[p.ID], string(e.Key))
		}
	}
	w.Walk(*records, func(boltraw.Elem) bool { return true }, func(p boltraw.Problem) { t.Fatal(p) })
	require.Greater(t, len(leaves), 3)
	return leaves, rf.Meta
}

// middleLeaf picks a leaf of the records' bucket that is neither the first nor
// the last, and returns it with its keys.
func middleLeaf(t testing.TB, path string) (uint64, []string, boltraw.Meta) {
	t.Helper()
	leaves, meta := recordLeaves(t, path)
	var first, last string
	for _, keys := range leaves {
		if first == "" || keys[0] < first {
			first = keys[0]
		}
		if keys[len(keys)-1] > last {
			last = keys[len(keys)-1]
		}
	}
	for id, keys := range leaves {
		if keys[0] != first && keys[len(keys)-1] != last {
			return id, keys, meta
		}
	}
	t.Fatal("no middle leaf")
	return 0, nil, meta
}

// overwrite writes data at page id of the file at path, through a file of its
// own, as a failing disk or a stray process would, and returns what was
// there. A store that has the file open sees the change through its memory
// map at once.
func overwrite(t testing.TB, path string, pageSize uint32, id uint64, data []byte) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	old := make([]byte, len(data))
	_, err = f.ReadAt(old, int64(id)*int64(pageSize))
	require.NoError(t, err)
	_, err = f.WriteAt(data, int64(id)*int64(pageSize))
	require.NoError(t, err)
	return old
}

// garbageHeader is a page header that claims to be another page, of no type.
var garbageHeader = []byte{0xef, 0xbe, 0xad, 0xde, 0, 0, 0, 0, 0x5a, 0x5a, 0xff, 0xff, 0, 0, 0, 0}

// noPanic calls f and reports its panic as a test failure instead of a crash.
func noPanic(t testing.TB, what string, f func()) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Errorf("%s panicked: %v", what, r)
		}
	}()
	f()
}

// within calls f and fails the test if it has not returned after d: a call
// that waits for a lock nobody will release.
func within(t testing.TB, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s has not returned after %v: it waits for a lock that nobody will release", what, d)
	}
}

// assertCorrupt checks that err is the error for the damaged file at path:
// ErrCorrupt, naming the file and what to do.
func assertCorrupt(t testing.TB, err error, path string) {
	t.Helper()
	require.ErrorIs(t, err, boltstore.ErrCorrupt)
	msg := err.Error()
	assert.Contains(t, msg, path, "the error names the file")
	assert.Contains(t, msg, "idempotency check -db "+path)
	assert.Contains(t, msg, "idempotency salvage -db "+path)
	assert.Contains(t, msg, "move the file aside")
}

// TestOpenBoltCorruptFile opens files damaged in the ways of issue 9: bbolt
// panics on some (in CreateBucketIfNotExists, in its own Open, or faults on
// a page past the end of a truncated file), returns an error on others.
// OpenBolt must return ErrCorrupt for each, without a panic, and without
// keeping the file locked: once the file is good again, it opens at once in
// the same process.
func TestOpenBoltCorruptFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "good.db")
	s, err := boltstore.Open(path)
	require.NoError(t, err)
	seedBolt(t, s, 300)
	require.NoError(t, s.Close())
	good, err := os.ReadFile(path)
	require.NoError(t, err)
	_, meta := recordLeaves(t, path)
	ps := int(meta.PageSize)

	for _, tc := range []struct {
		name   string
		damage func(b []byte) []byte
	}{
		{"data pages XORed", func(b []byte) []byte {
			// Every data page but the freelist: bbolt opens the file, then
			// panics on the root bucket's page in CreateBucketIfNotExists.
			for id := 2; id < int(meta.Pgid); id++ {
				if uint64(id) == meta.Freelist {
					continue
				}
				for i := id * ps; i < (id+1)*ps; i++ {
					b[i] ^= 0x5a
				}
			}
			return b
		}},
		{"truncated to half", func(b []byte) []byte { return b[:len(b)/2] }},
		{"truncated before the freelist", func(b []byte) []byte {
			// The freelist page lies past the end of the file but inside
			// bbolt's memory map: reading it faults (SIGBUS).
			return b[:int(meta.Freelist)*ps-ps/2]
		}},
		{"garbage meta pages", func(b []byte) []byte {
			for i := range 2 * ps {
				b[i] = byte(i*7 + 3)
			}
			return b
		}},
		{"one page", func(b []byte) []byte { return b[:ps] }},
		{"a few bytes", func([]byte) []byte { return []byte("not a bbolt file") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "idem.db")
			require.NoError(t, os.WriteFile(path, tc.damage(append([]byte(nil), good...)), 0o600))
			noPanic(t, "OpenBolt", func() {
				s, err := boltstore.Open(path)
				if err == nil {
					s.Close()
				}
				assertCorrupt(t, err, path)
				t.Log(err)
			})

			// Repaired in place (the same file, the same inode): it opens
			// at once, so the failed open left neither the file lock nor
			// the registry entry behind.
			require.NoError(t, os.WriteFile(path, good, 0o600))
			start := time.Now()
			s, err := boltstore.Open(path, boltstore.WithLockTimeout(500*time.Millisecond))
			require.NoError(t, err, "the failed open must release the file")
			defer s.Close()
			assert.Less(t, time.Since(start), 400*time.Millisecond)
			e, err := s.Lookup(context.Background(), seedKey(7))
			require.NoError(t, err)
			assert.Equal(t, idempotency.Completed, e.State)
		})
	}

	// Not a regression test: an empty file is a new store, as bbolt makes
	// it (os.CreateTemp, touch); it holds no record that could be lost.
	t.Run("empty file", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "idem.db")
		require.NoError(t, os.WriteFile(path, nil, 0o600))
		openBolt(t, path)
	})
}

// TestBoltCorruptPageWhileOpen damages a leaf page of the records' bucket
// under an open store (through the file; the store sees it in its memory
// map, where bbolt panics on it), then cuts the file short under it (where
// reading faults). Every call that needs the page must fail with ErrCorrupt,
// and the interceptor must answer Unavailable without running the handler;
// nothing panics, and once the page is repaired the store serves again and
// closes cleanly.
func TestBoltCorruptPageWhileOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "idem.db")
	s := openBolt(t, path, boltstore.WithCacheRecords(0))
	seedBolt(t, s, 300)
	leaf, keys, meta := middleLeaf(t, path)
	ctx := context.Background()
	onLeaf := keys[len(keys)/2]
	between := keys[0] + "~" // an absent key that sorts into the leaf
	e := newEnv(t, s, envConfig{})
	_, key, ok := strings.Cut(onLeaf, "/")
	require.True(t, ok)

	// calls makes the calls that need the damaged page; writes, when the
	// rest of the file is sound.
	calls := func(t *testing.T, writes bool) {
		noPanic(t, "Lookup", func() {
			_, err := s.Lookup(ctx, onLeaf)
			assertCorrupt(t, err, path)
		})
		noPanic(t, "Reserve", func() {
			_, err := s.Reserve(ctx, onLeaf, idempotency.Claim{Token: "t2", Lease: time.Minute})
			assertCorrupt(t, err, path)
		})
		noPanic(t, "Records", func() {
			assertCorrupt(t, s.Records(func(string, idempotency.Entry) bool { return true }), path)
		})
		if writes {
			noPanic(t, "Forget", func() {
				_, err := s.Forget(onLeaf)
				assertCorrupt(t, err, path)
			})
			noPanic(t, "Complete", func() {
				// The commit (in the store's committer goroutine) reads
				// the leaf to place the new record.
				assertCorrupt(t, s.Complete(ctx, between, "t3", []byte("rec"), time.Hour), path)
			})
		}
		noPanic(t, "a call", func() {
			_, err := e.client.Charge(withKey(testCtx(t), key), &testpb.ChargeRequest{Account: "acct", AmountCents: 100, Currency: "EUR"})
			assert.Equal(t, codes.Unavailable, status.Code(err), "%v", err)
		})
		assert.Zero(t, e.svc.execs.Load(), "the handler did not run")
		if writes {
			// Keys on other pages are served as before.
			got, err := s.Lookup(ctx, seedKey(0))
			require.NoError(t, err)
			assert.Equal(t, idempotency.Completed, got.State)
		}
	}

	t.Run("page bbolt cannot decode", func(t *testing.T) {
		old := overwrite(t, path, meta.PageSize, leaf, garbageHeader)
		calls(t, true)
		overwrite(t, path, meta.PageSize, leaf, old)
	})
	t.Run("file cut short under the memory map", func(t *testing.T) {
		whole, err := os.ReadFile(path)
		require.NoError(t, err)
		require.NoError(t, os.Truncate(path, int64(leaf)*int64(meta.PageSize)))
		// Reads only: a commit would fault in bbolt's rollback too, which
		// leaves the store refusing every call (TestBoltWedgedFailsFast).
		calls(t, false)
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		require.NoError(t, err)
		_, err = f.WriteAt(whole[leaf*uint64(meta.PageSize):], int64(leaf)*int64(meta.PageSize))
		require.NoError(t, err)
		require.NoError(t, f.Close())
	})

	// Repaired: served again; Close and the file check follow (openBolt).
	got, err := s.Lookup(ctx, onLeaf)
	require.NoError(t, err)
	assert.Equal(t, idempotency.Completed, got.State)
	require.NoError(t, s.Complete(ctx, between, "t3", []byte("rec"), time.Hour))
	n := 0
	require.NoError(t, s.Records(func(string, idempotency.Entry) bool { n++; return true }))
	assert.Equal(t, 301, n)
}

// TestBoltWedgedFailsFast damages, under an open store, a leaf page of the
// records' bucket and the freelist page, so that a commit panics and bbolt's
// own rollback panics too, leaving bbolt's writer lock held. The commit must
// fail with ErrCorrupt; every later call must fail at once instead of waiting
// for that lock forever; Close must return and release the file, which
// opens again in this process once it is repaired.
func TestBoltWedgedFailsFast(t *testing.T) {
	path := filepath.Join(t.TempDir(), "idem.db")
	s, err := boltstore.Open(path, boltstore.WithCacheRecords(0))
	require.NoError(t, err)
	seedBolt(t, s, 300)
	leaf, keys, meta := middleLeaf(t, path)
	ctx := context.Background()
	oldLeaf := overwrite(t, path, meta.PageSize, leaf, garbageHeader)
	oldFreelist := overwrite(t, path, meta.PageSize, meta.Freelist, garbageHeader)

	noPanic(t, "Complete", func() {
		assertCorrupt(t, s.Complete(ctx, keys[0]+"~", "t", []byte("rec"), time.Hour), path)
	})
	within(t, 5*time.Second, "Complete after the wedge", func() {
		err := s.Complete(ctx, seedKey(0)+"~", "t", []byte("rec"), time.Hour)
		assertCorrupt(t, err, path)
		assert.Contains(t, err.Error(), "refuses every call")
	})
	within(t, 5*time.Second, "Forget after the wedge", func() {
		_, err := s.Forget(seedKey(1))
		assertCorrupt(t, err, path)
	})
	within(t, 5*time.Second, "Lookup after the wedge", func() {
		_, err := s.Lookup(ctx, seedKey(2))
		assertCorrupt(t, err, path)
	})
	within(t, 5*time.Second, "Close", func() { s.Close() })

	overwrite(t, path, meta.PageSize, leaf, oldLeaf)
	overwrite(t, path, meta.PageSize, meta.Freelist, oldFreelist)
	start := time.Now()
	s2 := openBolt(t, path, boltstore.WithLockTimeout(500*time.Millisecond))
	assert.Less(t, time.Since(start), 400*time.Millisecond, "the file lock was released")
	for _, k := range []string{seedKey(0), keys[0], seedKey(299)} {
		e, err := s2.Lookup(ctx, k)
		require.NoError(t, err)
		assert.Equal(t, idempotency.Completed, e.State, k)
	}
}

// TestOpenBoltSameFileTwice opens a file that a store of this process holds,
// under the same path and others that name the same file: it must fail at
// once (not after the 2-second lock timeout) with ErrAlreadyOpen, saying so,
// and open again once the first store is closed.
func TestOpenBoltSameFileTwice(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "idem.db")
	first, err := boltstore.Open(path)
	require.NoError(t, err)
	require.NoError(t, os.Symlink(path, filepath.Join(dir, "link.db")))
	require.NoError(t, os.Link(path, filepath.Join(dir, "hard.db")))
	require.NoError(t, os.Mkdir(filepath.Join(dir, "sub"), 0o700))
	t.Chdir(dir)

	for _, p := range []string{path, "idem.db", "./idem.db", filepath.Join(dir, "sub", "..", "idem.db"), "link.db", "hard.db"} {
		start := time.Now()
		s, err := boltstore.Open(p)
		if err == nil {
			s.Close()
		}
		require.ErrorIs(t, err, boltstore.ErrAlreadyOpen, p)
		assert.ErrorIs(t, err, boltstore.ErrLocked, "%s: still a file in use, for callers that test for it", p)
		assert.NotContains(t, err.Error(), "another process", p)
		assert.Less(t, time.Since(start), 500*time.Millisecond, "%s: at once, not after the lock timeout", p)
		assert.Contains(t, err.Error(), "already open in this process", p)
		assert.Contains(t, err.Error(), "share that store", p)
		assert.Contains(t, err.Error(), p, "the error names the path given")
	}

	require.NoError(t, first.Close())
	second, err := boltstore.Open("link.db", boltstore.WithLockTimeout(500*time.Millisecond))
	require.NoError(t, err)
	require.NoError(t, second.Close())
}

// TestSalvageBoltReplaysReadableRecords records first executions through the
// interceptor, damages the file, and recovers as docs/bbolt-recovery.md
// says: CheckBolt reports the damage, SalvageBolt copies every readable
// record into a new file, which passes the check and opens with OpenBolt;
// there every copied call replays the first execution's answer (the handler
// does not run), and only the calls whose records could not be read run
// again. The damage: a leaf page of the records that bbolt cannot decode
// (its records are lost), and a file truncated to half (the tree's root is
// lost; the records on the remaining leaves are found by scanning).
func TestSalvageBoltReplaysReadableRecords(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "idem.db")
	s, err := boltstore.Open(path)
	require.NoError(t, err)
	e := newEnv(t, s, envConfig{})
	ctx := testCtx(t)
	const n = 200
	charge := func(client testpb.PaymentServiceClient, i int) (string, bool) {
		var header metadata.MD
		resp, err := client.Charge(withKey(ctx, fmt.Sprintf("k-%04d", i)),
			&testpb.ChargeRequest{Account: fmt.Sprintf("acct-%d", i), AmountCents: int64(100 + i), Currency: "EUR"}, grpc.Header(&header))
		require.NoError(t, err)
		return resp.ChargeId, idempotency.IsReplayed(header)
	}
	first := map[int]string{}
	for i := range n {
		first[i], _ = charge(e.client, i)
	}
	require.NoError(t, s.Close())
	good, err := os.ReadFile(path)
	require.NoError(t, err)
	leaf, lostKeys, meta := middleLeaf(t, path)

	// recoverFile checks, salvages and replays the damaged file at path, and
	// returns the calls that ran again.
	recoverFile := func(t *testing.T, path string) (boltstore.SalvageReport, map[string]bool) {
		var check boltstore.CheckReport
		noPanic(t, "CheckBolt", func() {
			check, err = boltstore.Check(path)
			require.NoError(t, err)
		})
		require.False(t, check.OK())
		t.Logf("check: %q", check.Problems)

		salvaged := filepath.Join(t.TempDir(), "salvaged.db")
		r, err := boltstore.Salvage(path, salvaged)
		require.NoError(t, err)
		t.Logf("salvage: %+v", r)
		check, err = boltstore.Check(salvaged)
		require.NoError(t, err)
		assert.True(t, check.OK(), "%q", check.Problems)
		assert.True(t, check.BboltChecked)
		assert.Equal(t, r.Copied, check.Records)

		s2 := openBolt(t, salvaged)
		e2 := newEnv(t, s2, envConfig{})
		ranAgain := map[string]bool{}
		for i := range n {
			id, replayed := charge(e2.client, i)
			if replayed {
				assert.Equal(t, first[i], id, "k-%04d replays the first execution's answer", i)
			} else {
				ranAgain[seedKey(i)] = true
			}
		}
		assert.Len(t, ranAgain, n-r.Copied, "every copied call replays")
		assert.EqualValues(t, len(ranAgain), e2.svc.execs.Load())
		return r, ranAgain
	}

	t.Run("leaf page bbolt cannot decode", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "idem.db")
		require.NoError(t, os.WriteFile(path, good, 0o600))
		overwrite(t, path, meta.PageSize, leaf, garbageHeader)
		r, ranAgain := recoverFile(t, path)
		assert.Equal(t, n-len(lostKeys), r.Copied)
		assert.Equal(t, 1, r.LostPages)
		assert.Zero(t, r.Skipped)
		assert.Zero(t, r.Scanned, "no page of records is left unreached")
		lost := map[string]bool{}
		for _, k := range lostKeys {
			lost[k] = true
		}
		assert.Equal(t, lost, ranAgain, "exactly the calls on the lost page run again")
	})
	t.Run("truncated to half", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "idem.db")
		require.NoError(t, os.WriteFile(path, good[:len(good)/2], 0o600))
		r, _ := recoverFile(t, path)
		assert.True(t, r.TreeLost)
		assert.Equal(t, r.Copied, r.Scanned)
		assert.Greater(t, r.Copied, n/4, "the records on the leaves left were found")
	})
}
