package idempotency_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc/metadata"

	"github.com/grpcidem/idempotency"
	"github.com/grpcidem/idempotency/boltstore"
)

// dayRecords is a day of retention at 500 first executions a second.
const dayRecords = 500 * 86400

// BenchmarkBoltDay measures first executions at 64 callers on a bbolt file
// of realistic size: a day of retention at 500 first executions a second
// (43.2 million records, a 17 GB file), with the keys clients send (random
// 128-bit keys, so that each commit touches leaves all over the file),
// against the call without the interceptor in the same run. The file is
// built once (about six minutes here) and kept in the temporary directory; each
// run adds its own records to it. Its records expire ten years after it was
// built, so that the sweeper leaves it alone.
//
// It runs only with IDEMPOTENCY_BENCH_DAY=1, as the file takes 17 GB:
//
//	IDEMPOTENCY_BENCH_DAY=1 go test -run '^$' -bench 'BenchmarkBoltDay' -count 5 -timeout 2h .
//
// bolt is the store as Open makes it; bolt-etcd adds the settings etcd runs
// bbolt with: no freelist sync (the freelist is rebuilt by a scan on open
// instead of written at each commit), the hash-map freelist, and an initial
// memory map that covers the file. Each reports cpu-µs/op, and
// BENCH_DAY_PROFILE=dir writes a CPU profile of each to dir.
func BenchmarkBoltDay(b *testing.B) {
	if os.Getenv("IDEMPOTENCY_BENCH_DAY") != "1" {
		b.Skip("set IDEMPOTENCY_BENCH_DAY=1 to build (once, 17 GB in the temporary directory) and use a day-sized bbolt file")
	}
	path := dayFile(b)
	b.Run("none/baseline/p64", func(b *testing.B) {
		runCalls(b, benchClient(b, nil), 64, nil)
	})
	for _, variant := range []struct {
		name string
		opts *bolt.Options
	}{
		{"bolt", nil},
		{"bolt-etcd", &bolt.Options{NoFreelistSync: true, FreelistType: bolt.FreelistMapType, InitialMmapSize: 32 << 30}},
	} {
		b.Run(variant.name+"/first/p64", func(b *testing.B) {
			var opts []boltstore.Option
			if variant.opts != nil {
				opts = append(opts, boltstore.WithBoltOptions(variant.opts))
			}
			opened := time.Now()
			s, err := boltstore.Open(path, opts...)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { s.Close() })
			openTime := time.Since(opened)
			if dir := os.Getenv("BENCH_DAY_PROFILE"); dir != "" {
				f, err := os.Create(filepath.Join(dir, variant.name+".cpu.pprof"))
				if err != nil {
					b.Fatal(err)
				}
				if err := pprof.StartCPUProfile(f); err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { pprof.StopCPUProfile(); f.Close() })
			}
			runCalls(b, benchClient(b, s), 64, randomKeys)
			reportCommits(b, s)
			b.ReportMetric(float64(openTime.Milliseconds()), "open-ms")
		})
	}
}

// randomKeys gives each call a random key, as clients make them.
func randomKeys(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, idempotency.KeyHeader, idempotency.NewKey())
}

// dayFile returns the day-sized file, building it the first time.
func dayFile(b *testing.B) string {
	b.Helper()
	dir := filepath.Join(os.TempDir(), "idempotency-bench")
	path := filepath.Join(dir, fmt.Sprintf("day-%d.db", dayRecords))
	if _, err := os.Stat(path); err == nil {
		return path
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		b.Fatal(err)
	}
	record := storedRecord(b)
	tmp := path + ".building"
	os.Remove(tmp)
	start := time.Now()
	if err := buildDayFile(tmp, record, dayRecords); err != nil {
		os.Remove(tmp)
		b.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		b.Fatal(err)
	}
	b.Logf("built %s in %v", path, time.Since(start).Round(time.Second))
	return path
}

// buildDayFile writes n records as BoltStore stores them (the record under
// its store key, with its expiry index entry), with keys that spread evenly
// and randomly over the key space of idempotency.NewKey, in key order and
// large transactions so that it takes minutes, not hours. The records bucket
// is filled to 70%, as random inserts leave a B+tree; the expiry index, which
// a server appends to in time order, to 50%, as bbolt leaves appended pages.
func buildDayFile(path string, record []byte, n int) error {
	db, err := bolt.Open(path, 0o600, &bolt.Options{NoSync: true, InitialMmapSize: 32 << 30})
	if err != nil {
		return err
	}
	defer db.Close()
	recordsName, expiryName := []byte(boltstore.DefaultBucket), []byte(boltstore.DefaultBucket+".expiry")
	base := time.Now().AddDate(10, 0, 0)
	step := uint64(1<<60) / uint64(n)
	rng := rand.New(rand.NewPCG(1, 2))
	const batch = 200_000
	for done := 0; done < n; {
		err := db.Update(func(tx *bolt.Tx) error {
			records, err := tx.CreateBucketIfNotExists(recordsName)
			if err != nil {
				return err
			}
			expiry, err := tx.CreateBucketIfNotExists(expiryName)
			if err != nil {
				return err
			}
			records.FillPercent, expiry.FillPercent = 0.7, 0.5
			for end := min(n, done+batch); done < end; done++ {
				key := sortedKey(uint64(done)*step+rng.Uint64N(step), rng)
				value := make([]byte, 8+len(record))
				// Expiries a day apart in time order, as a day of first
				// executions leaves them, but ten years out.
				exp := base.Add(time.Duration(done) * (24 * time.Hour / time.Duration(n)))
				binary.BigEndian.PutUint64(value, uint64(exp.UnixNano()))
				copy(value[8:], record)
				if err := records.Put(key, value); err != nil {
					return err
				}
				if err := expiry.Put(append(value[:8:8], key...), nil); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return db.Sync()
}

// sortedKey returns a store key (scope "", as StoreKey makes it) for a
// 22-character key in NewKey's alphabet whose first ten characters encode
// top (60 bits) in the alphabet's byte order, so that keys made from
// increasing tops are in increasing order, and the rest are random.
func sortedKey(top uint64, rng *rand.Rand) []byte {
	const alphabet = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz" // base64url, sorted
	k := make([]byte, 0, 23)
	k = append(k, '/')
	for i := 9; i >= 0; i-- {
		k = append(k, alphabet[(top>>(6*uint(i)))&63])
	}
	for range 12 {
		k = append(k, alphabet[rng.IntN(64)])
	}
	if idempotency.StoreKey("", string(k[1:])) != string(k) {
		panic("store key format changed: " + strconv.Quote(string(k)))
	}
	return k
}
