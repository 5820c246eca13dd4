package boltstore

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/grpcidem/idempotency/internal/boltraw"
)

// ErrCorrupt is returned (wrapped) when the bbolt file is damaged: by
// Open when the file cannot be read as a bbolt database (invalid meta
// pages, a truncated file, pages bbolt cannot decode), and by a store call
// that meets a damaged page while the store runs (bbolt panicked or faulted
// on it; the call fails, and the interceptors answer Unavailable without
// running the handler). The process never crashes on a damaged file. The
// error names the file and what to do: stop the server, run
// `idempotency check` and `idempotency salvage` on the file (see
// docs/bbolt-recovery.md), or move the file aside.
var ErrCorrupt = errors.New("idempotency: bbolt file is corrupt")

// ErrAlreadyOpen is returned (wrapped) by Open, at once, when a
// Store of this process already has the file open, under whatever path
// (a symbolic or hard link, a relative path): a bbolt file serves one store.
// Share that store instead of opening the file again, or Close it first.
// The error is also ErrLocked (errors.Is), as it was when Open waited
// for the lock to time out, for callers that test for a file in use.
var ErrAlreadyOpen = errors.New("idempotency: bbolt file is already open in this process")

// alreadyOpen is the error of ErrAlreadyOpen for path, which is the file
// that other holds.
func alreadyOpen(path, other, advice string) error {
	return alreadyOpenError{fmt.Errorf("%w: %s is the file %s, which a Store of this process holds; %s",
		ErrAlreadyOpen, path, other, advice)}
}

type alreadyOpenError struct{ err error }

func (e alreadyOpenError) Error() string        { return e.err.Error() }
func (e alreadyOpenError) Unwrap() error        { return e.err }
func (e alreadyOpenError) Is(target error) bool { return target == ErrLocked }

// boltFile is the bbolt file of a Store: what is needed to release it
// when bbolt cannot, and to refuse further work once bbolt is wedged.
type boltFile struct {
	path string                // as given to Open, or the DB's path
	f    *os.File              // the file bbolt opened (Open only), to release when bbolt cannot
	info os.FileInfo           // f's identity in the registry
	dead atomic.Pointer[error] // bbolt panicked and kept its locks: every transaction fails with this
	// logged is set once a panic was logged with its stack.
	logged atomic.Bool
}

// openFiles is the registry of the files Open has open in this process,
// by identity (device and inode), so that opening one again fails at once
// instead of waiting out the file lock this process itself holds.
var openFiles struct {
	sync.Mutex
	files []*boltFile
}

func (b *boltFile) register(f *os.File) error {
	info, err := f.Stat()
	if err != nil {
		return err
	}
	openFiles.Lock()
	defer openFiles.Unlock()
	for _, o := range openFiles.files {
		if os.SameFile(o.info, info) {
			return alreadyOpen(b.path, o.path, "a bbolt file serves one store: share that store instead of opening the file again, or Close it first")
		}
	}
	b.f, b.info = f, info
	openFiles.files = append(openFiles.files, b)
	return nil
}

func (b *boltFile) unregister() {
	openFiles.Lock()
	defer openFiles.Unlock()
	openFiles.files = slices.DeleteFunc(openFiles.files, func(o *boltFile) bool { return o == b })
}

// openBoltFile is bbolt.Open on path for Open, safe on a damaged file:
// a panic or a memory fault inside bbolt becomes an error wrapping
// ErrCorrupt, with the file closed so that its lock is released; bbolt's
// own errors about the file's contents wrap ErrCorrupt too. The file is
// registered while it is open, so that this process cannot open it twice
// (ErrAlreadyOpen). Other errors are bbolt's.
func openBoltFile(path string, bo bolt.Options) (*bolt.DB, *boltFile, error) {
	b := &boltFile{path: path}
	open := bo.OpenFile
	if open == nil {
		open = os.OpenFile
	}
	// Called once, before bbolt locks the file.
	bo.OpenFile = func(name string, flag int, perm os.FileMode) (*os.File, error) {
		f, err := open(name, flag, perm)
		if err != nil {
			return nil, err
		}
		if err := b.register(f); err != nil {
			f.Close()
			return nil, err
		}
		return f, nil
	}
	db, err := b.open(&bo)
	if err == nil {
		return db, b, nil
	}
	b.unregister()
	switch {
	case b.f == nil, errors.Is(err, berrors.ErrTimeout), errors.Is(err, ErrCorrupt):
		// Not opened, locked by another process, or already explained.
		return nil, nil, err
	}
	// bbolt's errors about what it read, or others that the file explains.
	d := diagnose(path)
	switch {
	case d != nil:
		return nil, nil, corruptFile(path, d.Error(), err)
	case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrChecksum), errors.Is(err, berrors.ErrVersionMismatch):
		return nil, nil, corruptFile(path, "", err)
	}
	return nil, nil, err
}

// open calls bbolt.Open, and turns its panics and memory faults into
// ErrCorrupt after closing the file (bbolt does not: the file would stay
// locked, and this process could not open it again until it exits). The DB
// bbolt was building is abandoned; its memory map stays until the process
// exits.
func (b *boltFile) open(bo *bolt.Options) (db *bolt.DB, err error) {
	done := false
	defer func() {
		if done || !panicInBbolt() {
			return
		}
		r := recover()
		b.release()
		detail := fmt.Sprintf("bbolt panicked while opening it: %v", r)
		if d := diagnose(b.path); d != nil {
			detail = d.Error() + " (" + detail + ")"
		}
		db, err = nil, corruptFile(b.path, detail, nil)
	}()
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	db, err = bolt.Open(b.path, 0o600, bo)
	done = true
	return db, err
}

// diagnose reads the meta pages of the file at path, without bbolt, and
// returns what is wrong with them, if anything: no valid meta page, or a
// file shorter than its meta page says.
func diagnose(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil || info.Size() == 0 {
		return nil
	}
	_, err = boltraw.Open(f, info.Size())
	return err
}

// corruptFile is the error for the damaged bbolt file at path: what is
// wrong, and what to do about it.
func corruptFile(path, detail string, cause error) error {
	advice := fmt.Sprintf(". To recover, stop the server and run `idempotency check -db %[1]s` to see the damage, then "+
		"`idempotency salvage -db %[1]s -out NEW` to copy the readable records into a new file NEW and put it in place of the damaged one; "+
		"or move the file aside to start with an empty store (its records are lost, and their keys run the handler again). "+
		"See docs/bbolt-recovery.md", path)
	switch {
	case cause == nil:
		return fmt.Errorf("%w: %s: %s%s", ErrCorrupt, path, detail, advice)
	case detail == "":
		return fmt.Errorf("%w: %s: %w%s", ErrCorrupt, path, cause, advice)
	}
	return fmt.Errorf("%w: %s: %s (bbolt: %w)%s", ErrCorrupt, path, detail, cause, advice)
}

// view and update are db.View and db.Update for the store's every
// transaction, safe on a damaged file: a panic or a memory fault inside bbolt
// (a page it cannot decode, a file truncated under its memory map) becomes
// the call's error, wrapping ErrCorrupt, instead of a crashed process. If
// bbolt was left holding its locks (the panic struck where bbolt could not
// roll back), every later transaction of the store fails at once with that
// error instead of waiting for them forever, and Close releases the file
// without bbolt (a store on the caller's DB, from New, leaves the
// DB to its caller, whose db.Close would wait forever). A panic raised by
// fn's own code is not bbolt's, and goes on.
func (s *Store) view(fn func(*bolt.Tx) error) error   { return s.tx(false, fn) }
func (s *Store) update(fn func(*bolt.Tx) error) error { return s.tx(true, fn) }

func (s *Store) tx(writable bool, fn func(*bolt.Tx) error) (err error) {
	if dead := s.file.dead.Load(); dead != nil {
		return *dead
	}
	c := txCalls.Get().(*txCall)
	c.fn = fn
	done := false
	defer func() {
		if done || !panicInBbolt() {
			return
		}
		tx := c.tx
		r := recover()
		what := "a read"
		if writable {
			what = "a write"
		}
		if s.file.logged.CompareAndSwap(false, true) {
			s.logger.Error("idempotency: bbolt panicked on the store's file", "path", s.file.path, "panic", r, "stack", string(debug.Stack()))
		}
		if tx != nil && tx.DB() == nil {
			// bbolt rolled the transaction back: its locks are free.
			err = corruptFile(s.file.path, fmt.Sprintf("bbolt panicked in %s transaction: %v; this call failed, and so will the calls that need the damaged pages", what, r), nil)
			return
		}
		err = corruptFile(s.file.path, fmt.Sprintf("bbolt panicked in %s transaction, and was left holding its locks: %v; "+
			"the store refuses every call from now on, and the file must be opened again", what, r), nil)
		dead := err
		s.file.dead.CompareAndSwap(nil, &dead)
	}()
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	if writable {
		err = s.db.Update(c.run)
	} else {
		err = s.db.View(c.run)
	}
	done = true
	c.fn, c.tx = nil, nil
	txCalls.Put(c)
	return err
}

// txCall is a transaction of Store.tx: its function, and the bbolt
// transaction it runs in, so that after a panic tx can tell whether bbolt
// closed it. txCalls keeps them, their method value bound once, so that a
// transaction allocates nothing more than bbolt's own.
type txCall struct {
	fn  func(*bolt.Tx) error
	tx  *bolt.Tx
	run func(*bolt.Tx) error
}

var txCalls = sync.Pool{New: func() any {
	c := new(txCall)
	c.run = c.call
	return c
}}

func (c *txCall) call(t *bolt.Tx) error {
	c.tx = t
	return c.fn(t)
}

// closeDB closes the store's database, which Open opened, and removes it
// from the registry. If bbolt was left holding its locks, db.Close would wait
// for them forever: the file is closed instead, which releases its lock (the
// memory map stays until the process exits).
func (b *boltFile) closeDB(db *bolt.DB) error {
	defer b.unregister()
	if b.dead.Load() != nil {
		return b.release()
	}
	return db.Close()
}

// release unlocks and closes the file bbolt opened, when bbolt cannot.
func (b *boltFile) release() error {
	if b.f == nil {
		return nil
	}
	return errors.Join(unlockFile(b.f), b.f.Close())
}

// panicInBbolt reports, from a function deferred by the caller, whether the
// goroutine is panicking, and the panic was raised in bbolt's code (or by a
// memory fault in it), not in a function that bbolt called back.
func panicInBbolt() bool {
	pcs := make([]uintptr, 64)
	frames := runtime.CallersFrames(pcs[:runtime.Callers(3, pcs)])
	panicking := false
	for {
		f, more := frames.Next()
		switch {
		case !panicking:
			panicking = f.Function == "runtime.gopanic"
		case strings.HasPrefix(f.Function, "runtime."), stdlib(f.Function):
			// The runtime raising it (an index out of range, a fault), or
			// the standard library called by the code that did.
		default:
			return strings.HasPrefix(f.Function, "go.etcd.io/bbolt.") || strings.HasPrefix(f.Function, "go.etcd.io/bbolt/")
		}
		if !more {
			return false
		}
	}
}

// stdlib reports whether a function is in a standard package (or in
// main): its import path's first element has no dot.
func stdlib(function string) bool {
	first, _, nested := strings.Cut(function, "/")
	return !nested || !strings.Contains(first, ".")
}
