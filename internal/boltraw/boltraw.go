// Package boltraw reads a bbolt file (format version 2) page by page, with
// every offset checked, through an io.ReaderAt: no memory map and no bbolt
// code. A damaged file yields errors, never a panic or a memory fault, so
// that the idempotency store can say what is wrong with a file that bbolt
// itself cannot open, and copy out what is still readable.
//
// It reads; it never writes. It knows the layout of bbolt v1.x files: two
// meta pages, then branch, leaf, freelist and free pages, all in the byte
// order of the machine that wrote them (bbolt files do not move between
// byte orders).
package boltraw

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
)

// The layout of bbolt's pages (go.etcd.io/bbolt/internal/common).
const (
	magic       = 0xED0CDAED
	version     = 2
	headerSize  = 16 // page: id u64, flags u16, count u16, overflow u32
	elemSize    = 16 // branch: pos, ksize u32, pgid u64; leaf: flags, pos, ksize, vsize u32
	metaSize    = 64 // magic, version, pageSize, flags u32; root, sequence, freelist, pgid, txid, checksum u64
	metaSum     = 56 // the checksum covers the meta up to the checksum
	bucketSize  = 16 // a bucket's value: root page u64, sequence u64, then its inline page if root is 0
	noFreelist  = ^uint64(0)
	minPageSize = 1024

	branchFlag   = 0x01
	leafFlag     = 0x02
	metaFlag     = 0x04
	freelistFlag = 0x10

	// BucketFlag marks a leaf element whose value is a nested bucket.
	BucketFlag = 0x01
)

var order = binary.NativeEndian

// Meta is a meta page: where the file's trees start.
type Meta struct {
	PageSize uint32
	Flags    uint32
	Root     uint64 // the root page of the root bucket
	Sequence uint64
	Freelist uint64 // the freelist page, or ^0 if the freelist is not stored
	Pgid     uint64 // the high-water mark: pages 0 to Pgid-1 are in use or free
	Txid     uint64
}

// File is a bbolt file opened for reading.
type File struct {
	r    io.ReaderAt
	size int64
	// Meta is the meta page bbolt would use: the valid one with the
	// highest transaction id.
	Meta Meta
	// MetaPage is where Meta was read: 0 or 1.
	MetaPage int
	// MetaErrs says why a meta page is not valid (nil for a valid one).
	MetaErrs [2]error
}

// ErrNotBolt is returned (wrapped) by Open for a file that has no valid meta
// page, or is too short to hold both.
var ErrNotBolt = errors.New("no valid bbolt meta page")

// Open reads the meta pages of the bbolt file r of size bytes and checks
// that the file holds the pages its meta page counts. An error says what is
// wrong: no valid meta page, or a file shorter than its meta page says (a
// truncated file). A File is returned with the error when a meta page was
// found.
func Open(r io.ReaderAt, size int64) (*File, error) {
	f := &File{r: r, size: size}
	var metas [2]*Meta
	m0, err := f.readMeta(0)
	metas[0], f.MetaErrs[0] = m0, err
	pageSize := int64(0)
	if m0 != nil {
		pageSize = int64(m0.PageSize)
	}
	if pageSize != 0 {
		metas[1], f.MetaErrs[1] = f.readMeta(pageSize)
	} else {
		// As bbolt does: try every page size it may have used.
		f.MetaErrs[1] = errors.New("not found at any page size")
		for ps := int64(minPageSize); ps <= 16<<20 && ps < size; ps <<= 1 {
			if m, err := f.readMeta(ps); err == nil {
				metas[1], f.MetaErrs[1] = m, nil
				break
			}
		}
	}
	switch {
	case metas[0] == nil && metas[1] == nil:
		if size < 2*minPageSize {
			return nil, fmt.Errorf("%w: the file is %d bytes, too short for the two meta pages", ErrNotBolt, size)
		}
		return nil, fmt.Errorf("%w: meta page 0: %v; meta page 1: %v", ErrNotBolt, f.MetaErrs[0], f.MetaErrs[1])
	case metas[1] == nil || metas[0] != nil && metas[0].Txid >= metas[1].Txid:
		f.Meta, f.MetaPage = *metas[0], 0
	default:
		f.Meta, f.MetaPage = *metas[1], 1
	}
	ps := int64(f.Meta.PageSize)
	if size < 2*ps {
		return f, fmt.Errorf("the file is %d bytes, too short for the two meta pages of %d bytes", size, ps)
	}
	if f.Meta.Pgid < 2 || f.Meta.Pgid > uint64(size/ps) {
		return f, fmt.Errorf("the file is %d bytes, but its meta page (transaction %d) says it holds %d pages of %d bytes (%d bytes): it was truncated",
			size, f.Meta.Txid, f.Meta.Pgid, ps, f.Meta.Pgid*uint64(ps))
	}
	return f, nil
}

func (f *File) readMeta(off int64) (*Meta, error) {
	var b [headerSize + metaSize]byte
	if n, err := f.r.ReadAt(b[:], off); n < len(b) {
		return nil, fmt.Errorf("cannot read %d bytes at offset %d: %v", len(b), off, err)
	}
	m := b[headerSize:]
	switch {
	case order.Uint32(m[0:]) != magic:
		return nil, fmt.Errorf("no bbolt magic number at offset %d", off)
	case order.Uint32(m[4:]) != version:
		return nil, fmt.Errorf("format version %d at offset %d, not %d", order.Uint32(m[4:]), off, version)
	}
	h := fnv.New64a()
	h.Write(m[:metaSum])
	if h.Sum64() != order.Uint64(m[metaSum:]) {
		return nil, fmt.Errorf("checksum mismatch at offset %d", off)
	}
	meta := &Meta{
		PageSize: order.Uint32(m[8:]),
		Flags:    order.Uint32(m[12:]),
		Root:     order.Uint64(m[16:]),
		Sequence: order.Uint64(m[24:]),
		Freelist: order.Uint64(m[32:]),
		Pgid:     order.Uint64(m[40:]),
		Txid:     order.Uint64(m[48:]),
	}
	if meta.PageSize < minPageSize || meta.PageSize&(meta.PageSize-1) != 0 {
		return nil, fmt.Errorf("invalid page size %d at offset %d", meta.PageSize, off)
	}
	return meta, nil
}

// Page is a page of the file, with its overflow pages.
type Page struct {
	ID       uint64
	Flags    uint16
	Count    uint16
	Overflow uint32
	data     []byte // header included
}

// IsBranch and IsLeaf report the page's type.
func (p *Page) IsBranch() bool { return p.Flags == branchFlag }
func (p *Page) IsLeaf() bool   { return p.Flags == leafFlag }

// Type names the page's type, as bbolt does.
func (p *Page) Type() string { return pageType(p.Flags) }

func pageType(flags uint16) string {
	switch flags {
	case branchFlag:
		return "branch"
	case leafFlag:
		return "leaf"
	case metaFlag:
		return "meta"
	case freelistFlag:
		return "freelist"
	}
	return fmt.Sprintf("unknown<%02x>", flags)
}

// Page reads page id, which must lie, with its overflow, below the
// high-water mark and inside the file, and say that it is page id.
func (f *File) Page(id uint64) (*Page, error) {
	ps := uint64(f.Meta.PageSize)
	if id < 2 || id >= f.Meta.Pgid {
		return nil, fmt.Errorf("page %d is out of range: data pages are 2 to %d", id, f.Meta.Pgid-1)
	}
	if (id+1)*ps > uint64(f.size) {
		return nil, fmt.Errorf("page %d lies past the end of the file (%d bytes)", id, f.size)
	}
	var h [headerSize]byte
	if _, err := f.r.ReadAt(h[:], int64(id*ps)); err != nil {
		return nil, fmt.Errorf("page %d: %w", id, err)
	}
	p := &Page{ID: order.Uint64(h[0:]), Flags: order.Uint16(h[8:]), Count: order.Uint16(h[10:]), Overflow: order.Uint32(h[12:])}
	if p.ID != id {
		return nil, fmt.Errorf("page %d identifies as page %d", id, p.ID)
	}
	end := id + uint64(p.Overflow) + 1
	if end > f.Meta.Pgid {
		return nil, fmt.Errorf("page %d: %d overflow pages run past the high-water mark %d", id, p.Overflow, f.Meta.Pgid)
	}
	if end*ps > uint64(f.size) {
		return nil, fmt.Errorf("page %d lies past the end of the file (%d bytes)", id, f.size)
	}
	p.data = make([]byte, (uint64(p.Overflow)+1)*ps)
	if _, err := f.r.ReadAt(p.data, int64(id*ps)); err != nil {
		return nil, fmt.Errorf("page %d: %w", id, err)
	}
	return p, nil
}

// Elem is an element of a branch or leaf page.
type Elem struct {
	Flags uint32 // leaf: BucketFlag for a nested bucket
	Key   []byte
	Value []byte // leaf
	Child uint64 // branch: the page below
}

// IsBucket reports whether a leaf element is a nested bucket.
func (e Elem) IsBucket() bool { return e.Flags&BucketFlag != 0 }

// Elems returns the elements of a branch or leaf page. An element whose key
// or value lies outside the page is left out and reported in bad; an error
// says that the page cannot be read at all.
func (p *Page) Elems() (elems []Elem, bad []error, err error) {
	return elemsOf(p.data, p.Flags, p.Count, p.ID)
}

func elemsOf(data []byte, flags, count uint16, id uint64) (elems []Elem, bad []error, err error) {
	if flags != branchFlag && flags != leafFlag {
		return nil, nil, fmt.Errorf("page %d is a %s page, not a branch or leaf page", id, pageType(flags))
	}
	size := uint64(len(data))
	if headerSize+uint64(count)*elemSize > size {
		return nil, nil, fmt.Errorf("page %d: %d elements do not fit in its %d bytes", id, count, size)
	}
	elems = make([]Elem, 0, count)
	for i := range uint64(count) {
		at := headerSize + i*elemSize
		e := data[at : at+elemSize]
		var pos, ksize, vsize uint64
		var el Elem
		if flags == branchFlag {
			pos, ksize = uint64(order.Uint32(e[0:])), uint64(order.Uint32(e[4:]))
			el.Child = order.Uint64(e[8:])
		} else {
			el.Flags = order.Uint32(e[0:])
			pos, ksize, vsize = uint64(order.Uint32(e[4:])), uint64(order.Uint32(e[8:])), uint64(order.Uint32(e[12:]))
		}
		k := at + pos
		if k+ksize+vsize > size {
			bad = append(bad, fmt.Errorf("page %d, element %d: its key and value (%d bytes at offset %d) lie outside the page's %d bytes",
				id, i, ksize+vsize, k, size))
			continue
		}
		el.Key = data[k : k+ksize : k+ksize]
		el.Value = data[k+ksize : k+ksize+vsize : k+ksize+vsize]
		elems = append(elems, el)
	}
	return elems, bad, nil
}

// Bucket is where a bucket's tree starts: a root page, or an inline page
// held in the bucket's value.
type Bucket struct {
	Root   uint64
	inline []byte // the inline page, when Root is 0
}

// RootBucket is the file's root bucket, which holds the top-level buckets.
func (f *File) RootBucket() Bucket { return Bucket{Root: f.Meta.Root} }

// ParseBucket reads the value of a nested bucket's leaf element.
func ParseBucket(v []byte) (Bucket, error) {
	if len(v) < bucketSize {
		return Bucket{}, fmt.Errorf("a bucket's value of %d bytes is shorter than its %d-byte header", len(v), bucketSize)
	}
	b := Bucket{Root: order.Uint64(v)}
	if b.Root == 0 {
		if len(v) < bucketSize+headerSize {
			return Bucket{}, fmt.Errorf("an inline bucket's value of %d bytes cannot hold its page", len(v))
		}
		b.inline = v[bucketSize:]
	}
	return b, nil
}

// Problem is a part of a tree that could not be read.
type Problem struct {
	// Page is the page that could not be read (or held the element that
	// could not), 0 for an inline page.
	Page uint64
	// Lost is set when the whole page, and every page below it, was
	// skipped; otherwise one element was.
	Lost bool
	Err  error
}

func (p Problem) Error() string { return p.Err.Error() }

// Walker walks trees, and remembers the pages it has read so that a page
// reached twice (a damaged tree) is read once.
type Walker struct {
	f    *File
	seen map[uint64]bool
	// budget bounds the elements a walk visits: a sound file holds at most
	// one per 16 bytes, and a damaged one whose inline buckets overlap
	// could otherwise make a walk take exponential time.
	budget int64
	// Pages is called, if set, for each page read, with its depth in the
	// tree (0 for the bucket's root).
	Pages func(p *Page, depth int)
}

// NewWalker returns a Walker on f.
func (f *File) NewWalker() *Walker {
	return &Walker{f: f, seen: make(map[uint64]bool), budget: f.size/elemSize + 1024}
}

// spend takes n elements from the budget, and reports whether the walk may
// go on.
func (w *Walker) spend(n int, bad func(Problem)) bool {
	if w.budget < 0 {
		return false
	}
	w.budget -= int64(n)
	if w.budget < 0 {
		bad(Problem{Lost: true, Err: errors.New("the trees hold more elements than the file has room for: they loop; the walk stops")})
		return false
	}
	return true
}

// Walk calls leaf with every leaf element of b's tree, in page order, until
// leaf returns false. What cannot be read is reported to bad and skipped:
// an element, or a whole page with the pages below it.
func (w *Walker) Walk(b Bucket, leaf func(e Elem) bool, bad func(Problem)) {
	if b.Root == 0 {
		if len(b.inline) < headerSize {
			bad(Problem{Lost: true, Err: errors.New("an inline bucket's page is shorter than its header")})
			return
		}
		flags, count := order.Uint16(b.inline[8:]), order.Uint16(b.inline[10:])
		if flags != leafFlag {
			bad(Problem{Lost: true, Err: fmt.Errorf("an inline bucket's page is a %s page, not a leaf page", pageType(flags))})
			return
		}
		elems, badElems, err := elemsOf(b.inline, flags, count, 0)
		if err != nil {
			bad(Problem{Lost: true, Err: fmt.Errorf("inline bucket: %w", err)})
			return
		}
		for _, err := range badElems {
			bad(Problem{Err: fmt.Errorf("inline bucket: %w", err)})
		}
		if !w.spend(len(elems), bad) {
			return
		}
		for _, e := range elems {
			if !leaf(e) {
				return
			}
		}
		return
	}
	w.walk(b.Root, 0, leaf, bad)
}

func (w *Walker) walk(id uint64, depth int, leaf func(e Elem) bool, bad func(Problem)) bool {
	if w.seen[id] {
		bad(Problem{Page: id, Lost: true, Err: fmt.Errorf("page %d is reached twice", id)})
		return true
	}
	w.seen[id] = true
	p, err := w.f.Page(id)
	if err != nil {
		bad(Problem{Page: id, Lost: true, Err: err})
		return true
	}
	elems, badElems, err := p.Elems()
	if err != nil {
		bad(Problem{Page: id, Lost: true, Err: err})
		return true
	}
	if !w.spend(len(elems), bad) {
		return false
	}
	if w.Pages != nil {
		w.Pages(p, depth)
	}
	for _, err := range badElems {
		bad(Problem{Page: id, Lost: p.IsBranch(), Err: err})
	}
	for _, e := range elems {
		if p.IsBranch() {
			if !w.walk(e.Child, depth+1, leaf, bad) {
				return false
			}
		} else if !leaf(e) {
			return false
		}
	}
	return true
}

// Reached reports whether the walker has read page id, or tried to.
func (w *Walker) Reached(id uint64) bool { return w.seen[id] }

// Leaves calls fn with every leaf page of the file that reads well, in file
// order, whether a tree reaches it or not, but for the pages skip returns
// true for: it finds what is left of a tree whose upper pages are lost. Some
// of those pages may be old copies that bbolt freed; skip the free pages
// (see Freelist) to leave them out.
func (f *File) Leaves(skip func(id uint64) bool, fn func(p *Page)) {
	limit := min(f.Meta.Pgid, uint64(f.size)/uint64(f.Meta.PageSize))
	for id := uint64(2); id < limit; {
		if skip(id) {
			id++
			continue
		}
		p, err := f.Page(id)
		if err != nil {
			id++
			continue
		}
		if p.IsLeaf() {
			fn(p)
		}
		id += 1 + uint64(p.Overflow)
	}
}

// Freelist reads the freelist page and returns the free page ids it lists.
// It returns nil, nil if the file keeps no freelist.
func (f *File) Freelist() ([]uint64, error) {
	if f.Meta.Freelist == noFreelist {
		return nil, nil
	}
	p, err := f.Page(f.Meta.Freelist)
	if err != nil {
		return nil, fmt.Errorf("freelist: %w", err)
	}
	if p.Flags != freelistFlag {
		return nil, fmt.Errorf("freelist: page %d is a %s page", p.ID, p.Type())
	}
	at, count := uint64(headerSize), uint64(p.Count)
	if count == 0xFFFF {
		if len(p.data) < headerSize+8 {
			return nil, fmt.Errorf("freelist: page %d is too short for its count", p.ID)
		}
		count = order.Uint64(p.data[headerSize:])
		at += 8
	}
	if count > (uint64(len(p.data))-at)/8 {
		return nil, fmt.Errorf("freelist: page %d lists %d pages, more than its %d bytes hold", p.ID, count, len(p.data))
	}
	ids := make([]uint64, count)
	for i := range ids {
		ids[i] = order.Uint64(p.data[at+uint64(i)*8:])
		if ids[i] < 2 || ids[i] >= f.Meta.Pgid {
			return nil, fmt.Errorf("freelist: page %d lists page %d, out of range", p.ID, ids[i])
		}
	}
	return ids, nil
}
