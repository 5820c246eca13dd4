package boltraw

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// boltFile returns a bbolt file with a large bucket (its own pages) and a
// small one (inline in its parent's leaf) with a nested bucket, of page
// size 1024 to keep it small.
func boltFile(t testing.TB) []byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "f.db")
	db, err := bolt.Open(path, 0o600, &bolt.Options{PageSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		big, err := tx.CreateBucket([]byte("big"))
		if err != nil {
			return err
		}
		for i := range 100 {
			if err := big.Put(fmt.Appendf(nil, "key-%03d", i), bytes.Repeat([]byte{byte(i)}, 40)); err != nil {
				return err
			}
		}
		small, err := tx.CreateBucket([]byte("small"))
		if err != nil {
			return err
		}
		if err := small.Put([]byte("a"), []byte("1")); err != nil {
			return err
		}
		_, err = small.CreateBucket([]byte("nested"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readAll reads everything a File offers, as check and salvage do.
func readAll(b []byte) (keys int, problems int) {
	f, err := Open(bytes.NewReader(b), int64(len(b)))
	if f == nil {
		return 0, 1
	}
	if err != nil {
		problems++
	}
	if _, err := f.Freelist(); err != nil {
		problems++
	}
	w := f.NewWalker()
	var walk func(b Bucket)
	walk = func(b Bucket) {
		w.Walk(b, func(e Elem) bool {
			if e.IsBucket() {
				if nb, err := ParseBucket(e.Value); err == nil {
					walk(nb)
				} else {
					problems++
				}
				return true
			}
			keys++
			return true
		}, func(Problem) { problems++ })
	}
	walk(f.RootBucket())
	f.Leaves(w.Reached, func(p *Page) { _, _, _ = p.Elems() })
	return keys, problems
}

func TestReadsEveryKey(t *testing.T) {
	keys, problems := readAll(boltFile(t))
	if keys != 101 || problems != 0 {
		t.Fatalf("read %d keys with %d problems, want 101 and 0", keys, problems)
	}
}

// FuzzNeverPanics feeds damaged bbolt files to every reader: errors, never a
// panic, whatever the bytes.
func FuzzNeverPanics(f *testing.F) {
	good := boltFile(f)
	f.Add(good, uint(0), byte(0))
	for _, off := range []uint{0, 16, 1024, 2048, 3072, 5000} {
		f.Add(good, off, byte(0xff))
	}
	f.Add(good[:len(good)/2], uint(0), byte(0))
	f.Fuzz(func(t *testing.T, b []byte, off uint, x byte) {
		b = bytes.Clone(b)
		if len(b) > 0 {
			b[off%uint(len(b))] ^= x
		}
		readAll(b)
	})
}
