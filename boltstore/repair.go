package boltstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	"google.golang.org/protobuf/proto"

	"github.com/grpcidem/idempotency/internal/boltraw"

	"github.com/grpcidem/idempotency"
)

// CheckReport is what Check found in a bbolt file.
type CheckReport struct {
	// Problems says what is wrong with the file, one line each; the file is
	// sound when there are none.
	Problems []string
	// Notes says what is unusual but harmless: a meta page left invalid by
	// a crash in the middle of a commit, which bbolt does without.
	Notes []string
	// Records is how many records the store's bucket holds (readable ones),
	// Expired how many of those have expired and wait for the sweeper.
	Records, Expired int
	// BboltChecked says that bbolt's own consistency check (Tx.Check) ran:
	// it runs only on a file whose pages all read well, since bbolt crashes
	// on pages it cannot decode.
	BboltChecked bool
}

// OK reports whether the check found no problem.
func (c CheckReport) OK() bool { return len(c.Problems) == 0 }

// maxProblems bounds the problems a check or a salvage lists.
const maxProblems = 100

func (c *CheckReport) problem(format string, args ...any) {
	if len(c.Problems) < maxProblems {
		c.Problems = append(c.Problems, fmt.Sprintf(format, args...))
	} else if len(c.Problems) == maxProblems {
		c.Problems = append(c.Problems, "(more problems not listed)")
	}
}

// Check checks the bbolt file of a store at path, without changing it.
// It reads every page of the file's trees itself, with every offset
// checked, so that a damaged file cannot crash the process; then, if they
// all read well, runs bbolt's own consistency check (Tx.Check: free and
// reachable pages, key order). It also checks that every record in the
// store's bucket (WithBucket) is well formed. The returned CheckReport lists
// the problems; the error is for a file that could not be checked at all: it
// wraps ErrLocked when a process (a running server) has the file open, and
// ErrAlreadyOpen when a store of this process does.
func Check(path string, opts ...Option) (CheckReport, error) {
	c := newConfig(opts)
	var r CheckReport
	f, size, err := openForReading(path)
	if err != nil {
		return r, err
	}
	defer f.Close()
	rf, err := boltraw.Open(f, size)
	if err != nil {
		r.problem("%v", err)
	}
	if rf == nil {
		return r, nil
	}
	for i, err := range rf.MetaErrs {
		if err != nil && rf.MetaPage != i {
			r.Notes = append(r.Notes, fmt.Sprintf("meta page %d is not valid (%v); bbolt uses meta page %d, of transaction %d", i, err, rf.MetaPage, rf.Meta.Txid))
		}
	}
	if _, err := rf.Freelist(); err != nil {
		r.problem("%v", err)
	}
	now := time.Now()
	w := rf.NewWalker()
	var walk func(b boltraw.Bucket, name string, depth int)
	walk = func(b boltraw.Bucket, name string, depth int) {
		w.Walk(b, func(e boltraw.Elem) bool {
			if e.IsBucket() {
				nb, err := boltraw.ParseBucket(e.Value)
				if err != nil {
					r.problem("bucket %q: %v", joinBucket(name, e.Key), err)
					return true
				}
				walk(nb, joinBucket(name, e.Key), depth+1)
				return true
			}
			if depth != 1 || name != c.bucket {
				return true
			}
			r.Records++
			switch exp, err := checkBoltRecord(e.Key, e.Value); {
			case err != nil:
				r.problem("bucket %q: record %q: %v", name, e.Key, err)
			case !now.Before(exp):
				r.Expired++
			}
			return true
		}, func(p boltraw.Problem) {
			r.problem("bucket %q: %v", name, p.Err)
		})
	}
	walk(rf.RootBucket(), "", 0)
	if !r.OK() {
		return r, nil
	}
	problems, err := bboltCheck(path, c.lockTimeout)
	if err != nil {
		return r, err
	}
	r.BboltChecked = true
	for _, p := range problems {
		r.problem("bbolt: %s", p)
	}
	return r, nil
}

func joinBucket(parent string, key []byte) string {
	if parent == "" {
		return string(key)
	}
	return parent + "/" + string(key)
}

// checkBoltRecord checks a record as the store wrote it: its expiry, then a
// marshalled Record.
func checkBoltRecord(key, v []byte) (time.Time, error) {
	if len(v) < expiryLen {
		return time.Time{}, fmt.Errorf("its value of %d bytes is shorter than its expiry", len(v))
	}
	exp := time.Unix(0, int64(binary.BigEndian.Uint64(v)))
	if err := proto.Unmarshal(v[expiryLen:], new(idempotency.Record)); err != nil {
		return exp, fmt.Errorf("it does not decode: %w", err)
	}
	if err := idempotency.CheckStoreKey(string(key)); err != nil {
		return exp, err
	}
	return exp, nil
}

// bboltCheck opens path read-only with bbolt and runs Tx.Check. It is
// called on a file whose pages have all been read well.
func bboltCheck(path string, lockTimeout time.Duration) ([]string, error) {
	db, file, err := openBoltFile(path, bolt.Options{ReadOnly: true, Timeout: lockTimeout})
	if err != nil {
		return nil, err
	}
	s := &Store{db: db, file: file, logger: newConfig(nil).logger}
	defer file.closeDB(db)
	var problems []string
	err = s.view(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			problems = append(problems, err.Error())
		}
		return nil
	})
	if errors.Is(err, ErrCorrupt) {
		problems = append(problems, err.Error())
		err = nil
	}
	return problems, err
}

// openForReading opens the bbolt file at path for reading, as a bbolt
// reader would: it fails if a store of this process has it open
// (ErrAlreadyOpen) or another process does (ErrLocked), so that nothing
// writes the file while it is read.
func openForReading(path string) (*os.File, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	info, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	openFiles.Lock()
	for _, o := range openFiles.files {
		if os.SameFile(o.info, info) {
			openFiles.Unlock()
			f.Close()
			return nil, 0, alreadyOpen(path, o.path, "close it first")
		}
	}
	openFiles.Unlock()
	locked, err := lockShared(f)
	if err != nil || !locked {
		f.Close()
		if err == nil {
			err = fmt.Errorf("%w: %s; stop the server that uses it first", ErrLocked, path)
		}
		return nil, 0, err
	}
	return f, info.Size(), nil
}

// SalvageReport is what Salvage copied, and what it could not.
type SalvageReport struct {
	// Copied is how many records were written to the new file.
	Copied int
	// Scanned is how many of the copied records were found by scanning the
	// file's pages, because the damaged tree no longer reached them.
	Scanned int
	// Expired is how many readable records had expired: not copied, as the
	// sweeper would have deleted them.
	Expired int
	// Skipped is how many records were found but could not be read (their
	// value is damaged, or does not decode): not copied.
	Skipped int
	// SkippedKeys are the store keys of the skipped records whose key could
	// be read (see SplitStoreKey).
	SkippedKeys []string
	// TreeLost says that the records' tree could not be reached at all (the
	// pages above it are lost): every record was looked for by scanning.
	TreeLost bool
	// LostPages is how many pages of the records' tree could not be read.
	// The records on the leaves among them are lost, unless the scan of
	// the file's pages found them again; how many there were is unknown.
	LostPages int
	// FreedPagesScanned says that the freelist could not be read, so the
	// scan read the pages bbolt had freed too: a record deleted with Forget
	// may be back in the new file.
	FreedPagesScanned bool
	// Problems says what could not be read, one line each.
	Problems []string
}

func (s *SalvageReport) problem(format string, args ...any) {
	if len(s.Problems) < maxProblems {
		s.Problems = append(s.Problems, fmt.Sprintf(format, args...))
	} else if len(s.Problems) == maxProblems {
		s.Problems = append(s.Problems, "(more problems not listed)")
	}
}

// salvageBatch is how many records one transaction of Salvage writes.
const salvageBatch = 1000

// Salvage copies every record of a store's bucket (WithBucket) that can
// still be read from the bbolt file at src, however damaged, into a new
// store file at dst, which must not exist, and reports what it copied and
// what it could not. It reads src page by page without bbolt, skipping what
// cannot be read, and never writes it. It walks the records' tree first; if
// pages of the tree are lost (a truncated file loses its newest pages, the
// tree's root among them), it then scans the file's other pages for leaves
// of records that the tree no longer reaches, leaving out the pages bbolt
// had freed. dst is written by the store, so it passes Check and opens
// with Open, and its records replay as they did from src (expired ones
// are left out). A key whose record was skipped or lost runs its handler
// again on its next call. Only the records' bucket is copied: not other
// buckets that an application keeps in the file. It fails with ErrLocked if
// a process (a running server) has src open: stop it first.
func Salvage(src, dst string, opts ...Option) (SalvageReport, error) {
	c := newConfig(opts)
	var r SalvageReport
	f, size, err := openForReading(src)
	if err != nil {
		return r, err
	}
	defer f.Close()
	rf, err := boltraw.Open(f, size)
	if rf == nil {
		return r, unsalvageable(src, err.Error())
	}
	if err != nil {
		r.problem("%v", err)
	}
	for i, err := range rf.MetaErrs {
		if err != nil && rf.MetaPage != i {
			r.problem("meta page %d is not valid (%v): the file is read as of transaction %d, and what a later one wrote, if any, is lost", i, err, rf.Meta.Txid)
		}
	}
	w := rf.NewWalker()
	var records *boltraw.Bucket
	treeLost := false
	w.Walk(rf.RootBucket(), func(e boltraw.Elem) bool {
		if !e.IsBucket() || string(e.Key) != c.bucket {
			return true
		}
		b, err := boltraw.ParseBucket(e.Value)
		if err != nil {
			r.problem("bucket %q: %v", c.bucket, err)
		} else {
			records = &b
		}
		return false
	}, func(p boltraw.Problem) {
		treeLost = true
		r.problem("the root bucket: %v", p.Err)
	})

	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return r, err
	}
	out.Close()
	s, err := Open(dst, WithBucket(c.bucket), WithCacheRecords(0))
	if err != nil {
		os.Remove(dst)
		return r, err
	}
	sw := &salvageWriter{s: s, r: &r}
	now := time.Now()
	if records != nil {
		w.Walk(*records, func(e boltraw.Elem) bool {
			if e.IsBucket() {
				r.problem("bucket %q: %q is a nested bucket, not a record: left out", c.bucket, e.Key)
				return true
			}
			exp, err := checkBoltRecord(e.Key, e.Value)
			switch {
			case err != nil:
				r.Skipped++
				r.SkippedKeys = append(r.SkippedKeys, string(e.Key))
				r.problem("record %q: %v: skipped", e.Key, err)
			case !now.Before(exp):
				r.Expired++
			default:
				sw.add(e.Key, e.Value, false)
			}
			return sw.err == nil
		}, func(p boltraw.Problem) {
			if p.Lost {
				r.LostPages++
				r.problem("bucket %q: %v: the records under it are lost", c.bucket, p.Err)
			} else {
				r.Skipped++
				r.problem("bucket %q: %v: skipped", c.bucket, p.Err)
			}
		})
	}
	sw.flush()
	r.TreeLost = records == nil
	if sw.err == nil && (records == nil || treeLost || r.LostPages > 0) {
		salvageScan(rf, w, c.bucket, now, sw)
	}
	if err := errors.Join(sw.err, s.Close()); err != nil {
		os.Remove(dst)
		return r, fmt.Errorf("idempotency: write %s: %w", dst, err)
	}
	if records == nil && r.Copied == 0 {
		os.Remove(dst)
		return r, unsalvageable(src, fmt.Sprintf("no readable bucket %q, and no record found in its pages (%s)", c.bucket, strings.Join(r.Problems, "; ")))
	}
	return r, nil
}

// salvageScan looks for the records that the damaged tree no longer
// reaches: on the leaf pages of the file that the walk did not reach and
// that are not free, it takes what looks like a record of the store (a
// store key, a live expiry, a Record with a method name), and for each key
// the copy with the latest expiry. The records that the walk copied stay.
func salvageScan(rf *boltraw.File, w *boltraw.Walker, bucket string, now time.Time, sw *salvageWriter) {
	r := sw.r
	free := map[uint64]bool{}
	if ids, err := rf.Freelist(); err != nil {
		r.FreedPagesScanned = true
		r.problem("%v: the scan reads the pages bbolt had freed too, so a record deleted with forget may be back", err)
	} else {
		for _, id := range ids {
			free[id] = true
		}
	}
	found := map[string][]byte{}
	take := func(e boltraw.Elem) {
		if e.IsBucket() {
			return
		}
		exp, ok := scannedRecord(e.Key, e.Value)
		if !ok || !now.Before(exp) {
			return
		}
		if old, dup := found[string(e.Key)]; dup && binary.BigEndian.Uint64(old) >= binary.BigEndian.Uint64(e.Value) {
			return
		}
		found[string(e.Key)] = bytes.Clone(e.Value)
	}
	rf.Leaves(func(id uint64) bool { return w.Reached(id) || free[id] }, func(p *boltraw.Page) {
		elems, _, err := p.Elems()
		if err != nil {
			return
		}
		for _, e := range elems {
			if e.IsBucket() && string(e.Key) == bucket {
				// A small records' bucket lives inline, in its parent's leaf.
				if b, err := boltraw.ParseBucket(e.Value); err == nil && b.Root == 0 {
					w.Walk(b, func(e boltraw.Elem) bool { take(e); return true }, func(boltraw.Problem) {})
				}
				continue
			}
			take(e)
		}
	})
	keys := make([]string, 0, len(found))
	for k := range found {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if sw.add([]byte(k), found[k], true); sw.err != nil {
			return
		}
	}
	sw.flush()
}

// scannedRecord reports whether a leaf element found by scanning pages is a
// record of the store, and its expiry: a store key, then a value that is an
// expiry and a Record of a gRPC method. Other buckets' elements (the
// expiry index, an application's) do not pass.
func scannedRecord(key, v []byte) (time.Time, bool) {
	if _, _, ok := idempotency.SplitStoreKey(string(key)); !ok || idempotency.CheckStoreKey(string(key)) != nil || len(v) < expiryLen {
		return time.Time{}, false
	}
	rec := new(idempotency.Record)
	if proto.Unmarshal(v[expiryLen:], rec) != nil || !strings.HasPrefix(rec.Method, "/") {
		return time.Time{}, false
	}
	return time.Unix(0, int64(binary.BigEndian.Uint64(v))), true
}

// salvageWriter writes salvaged records into the new store, in batches.
type salvageWriter struct {
	s     *Store
	r     *SalvageReport
	batch []salvaged
	err   error
}

type salvaged struct {
	key, value []byte
	scanned    bool
}

// add queues a record (cloned) and writes the queue when it is full.
func (sw *salvageWriter) add(key, value []byte, scanned bool) {
	sw.batch = append(sw.batch, salvaged{bytes.Clone(key), bytes.Clone(value), scanned})
	if len(sw.batch) == salvageBatch {
		sw.flush()
	}
}

// flush writes the queued records in one transaction. A key already written
// keeps its first record: the tree's copy over a scanned one.
func (sw *salvageWriter) flush() {
	if sw.err != nil || len(sw.batch) == 0 {
		return
	}
	s, r := sw.s, sw.r
	sw.err = s.update(func(tx *bolt.Tx) error {
		recs, expiry := tx.Bucket(s.records), tx.Bucket(s.expiry)
		for _, rec := range sw.batch {
			if recs.Get(rec.key) != nil {
				if !rec.scanned {
					r.problem("record %q appears twice; the first copy was kept", rec.key)
				}
				continue
			}
			if err := recs.Put(rec.key, rec.value); err != nil {
				return err
			}
			if err := expiry.Put(expiryKey(rec.value[:expiryLen], rec.key), nil); err != nil {
				return err
			}
			r.Copied++
			if rec.scanned {
				r.Scanned++
			}
		}
		return nil
	})
	sw.batch = sw.batch[:0]
}

// unsalvageable is the error of Salvage for a file where no record can
// be found.
func unsalvageable(src, detail string) error {
	return fmt.Errorf("%w: %s: %s; no record can be salvaged: move the file aside to start with an empty store "+
		"(its records are lost, and their keys run the handler again)", ErrCorrupt, src, detail)
}
