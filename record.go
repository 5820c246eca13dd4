package idempotency

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"hash"
	"hash/maphash"
	"slices"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// Record is the stored outcome of a first execution, as Stores keep it
// (marshalled) and replays read it.
type Record = idempotencyv1.Record

// fingerprint is SHA-256 over the full method name and the deterministic
// protobuf encoding of every request message, in order, each preceded by its
// length so that message boundaries count. The key field and the fields
// excluded from the fingerprint are left out of each message's encoding.
type fingerprint struct {
	h       hash.Hash
	buf     []byte
	n       int64
	filter  *requestFilter
	scratch [8]byte // a length; a field, so that writing it allocates nothing
}

var deterministic = proto.MarshalOptions{Deterministic: true}

var fingerprints = sync.Pool{New: func() any { return &fingerprint{h: sha256.New()} }}

func newFingerprint(method string, filter *requestFilter) *fingerprint {
	f := fingerprints.Get().(*fingerprint)
	f.h.Reset()
	f.n = 0
	f.filter = filter
	f.buf = append(append(f.buf[:0], method...), 0) // no conversion to escape
	f.h.Write(f.buf)
	return f
}

// release returns f, whose sum has been taken, for reuse.
func (f *fingerprint) release() {
	if cap(f.buf) > 64<<10 {
		f.buf = nil // keep the pool small
	}
	f.filter = nil
	fingerprints.Put(f)
}

func (f *fingerprint) add(m any) error {
	pm, ok := m.(proto.Message)
	if !ok {
		return status.Errorf(codes.Internal, "idempotency: request type %T is not a protobuf message, so it cannot be fingerprinted", m)
	}
	b, err := f.filter.encode(f.buf[:0], pm)
	if err != nil {
		return status.Errorf(codes.Internal, "idempotency: marshal request to fingerprint it: %v", err)
	}
	binary.BigEndian.PutUint64(f.scratch[:], uint64(len(b)))
	f.h.Write(f.scratch[:])
	f.h.Write(b)
	f.buf = b
	f.n++
	return nil
}

func (f *fingerprint) sum() []byte { return f.h.Sum(nil) }

// sumInto appends the sum to dst, which has room for it in the callers' own
// array, so that taking it allocates nothing.
func (f *fingerprint) sumInto(dst []byte) []byte { return f.h.Sum(dst) }

// mdToRecord turns metadata into the Record's form, keys sorted so that the
// same metadata always makes the same record.
func mdToRecord(md metadata.MD) []*idempotencyv1.Metadata {
	if len(md) == 0 {
		return nil
	}
	keys := make([]string, 0, len(md))
	for k := range md {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out := make([]*idempotencyv1.Metadata, 0, len(keys))
	for _, k := range keys {
		vs := make([][]byte, len(md[k]))
		for i, v := range md[k] {
			vs[i] = []byte(v)
		}
		out = append(out, &idempotencyv1.Metadata{Key: k, Values: vs})
	}
	return out
}

func mdFromRecord(rs []*idempotencyv1.Metadata, extra int) metadata.MD {
	md := make(metadata.MD, len(rs)+extra)
	for _, r := range rs {
		vs := make([]string, len(r.Values))
		for i, v := range r.Values {
			vs[i] = string(v)
		}
		md[r.Key] = vs
	}
	return md
}

// methodTypes are the request and response types of a method, found in the
// protobuf registry that generated code registers into.
type methodTypes struct {
	in, out protoreflect.MessageType
}

var methodTypeCache sync.Map // full method name -> methodTypes

func typesOf(fullMethod string) (methodTypes, error) {
	if t, ok := methodTypeCache.Load(fullMethod); ok {
		return t.(methodTypes), nil
	}
	md, err := findMethod(protoregistry.GlobalFiles, fullMethod)
	if err != nil {
		return methodTypes{}, err
	}
	var t methodTypes
	if t.in, err = protoregistry.GlobalTypes.FindMessageByName(md.Input().FullName()); err != nil {
		return methodTypes{}, err
	}
	if t.out, err = protoregistry.GlobalTypes.FindMessageByName(md.Output().FullName()); err != nil {
		return methodTypes{}, err
	}
	methodTypeCache.Store(fullMethod, t)
	return t, nil
}

// decodedRecords remembers the last record decoded for each of a few
// hundred store keys, so that a burst of replays of one key (a client
// retrying, a double submit) decodes its record once. A hit requires the
// stored bytes to be equal, so it is never stale. Decoded records are only
// read.
type decodedRecords struct {
	seed  maphash.Seed
	slots [256]atomic.Pointer[decodedRecord]
}

type decodedRecord struct {
	key string
	raw []byte
	rec *Record

	// response is the unary response of rec, decoded on its first replay.
	// Replays copy it (unaryResponse) instead of decoding it again; it is
	// never handed out, so nothing writes to it.
	response atomic.Pointer[decodedResponse]
	// md is the header and trailer a unary replay of rec sends, made on its
	// first replay (unaryMetadata).
	md atomic.Pointer[replayMD]
}

type decodedResponse struct{ msg proto.Message }

type replayMD struct{ header, trailer metadata.MD }

// unaryMetadata returns the header (ReplayedHeader with the handler's
// header) and the trailer (nil if it had none) that a unary replay of rec
// sends; d keeps rec decoded, or is nil. A kept record's are made once and
// shared by its replays: they are only read, as grpc-go's SetHeader and
// SetTrailer copy what they are given (metadata.Join), and so do this
// package's transportRecorder and the connect adapter.
func unaryMetadata(d *decodedRecord, rec *Record) (header, trailer metadata.MD) {
	if d == nil {
		return replayHeader(rec), replayTrailer(rec)
	}
	m := d.md.Load()
	if m == nil {
		m = &replayMD{header: replayHeader(rec), trailer: replayTrailer(rec)}
		d.md.Store(m)
	}
	return m.header, m.trailer
}

// replayHeader returns a new header for a replay of rec, or the shared
// replayedOnly if its first execution set none.
func replayHeader(rec *Record) metadata.MD {
	if len(rec.Header) == 0 {
		return replayedOnly
	}
	md := mdFromRecord(rec.Header, 1)
	md[ReplayedHeader] = replayedTrue
	return md
}

func replayTrailer(rec *Record) metadata.MD {
	if len(rec.Trailer) == 0 {
		return nil
	}
	return mdFromRecord(rec.Trailer, 0)
}

// replayedOnly is the header of a replay whose first execution set none.
// grpc-go copies the metadata it is given (metadata.Join), and so does this
// package's transportRecorder; nothing writes to these.
var (
	replayedTrue = []string{"true"}[:1:1]
	replayedOnly = metadata.MD{ReplayedHeader: replayedTrue}
)

// decode returns the record stored as raw under key, and the cache entry it
// is kept in: nil for a record too large to keep.
func (d *decodedRecords) decode(key string, raw []byte) (*Record, *decodedRecord, error) {
	slot := &d.slots[maphash.String(d.seed, key)%uint64(len(d.slots))]
	if c := slot.Load(); c != nil && c.key == key && bytes.Equal(c.raw, raw) {
		return c.rec, c, nil
	}
	rec := new(Record)
	if err := proto.Unmarshal(raw, rec); err != nil {
		return nil, nil, err
	}
	if len(raw) > 16<<10 {
		return rec, nil, nil
	}
	c := &decodedRecord{key: key, raw: raw, rec: rec}
	slot.Store(c)
	return rec, c, nil
}

// unaryResponse returns a new message of type t that holds raw, the one
// response of the record that d keeps (d is nil for a record not kept).
//
// A kept record's response is decoded once; every replay then gets a copy
// made by proto.Merge, which shares the decoded strings (immutable) instead
// of allocating each of them again, and copies everything mutable (bytes,
// lists, maps, messages, unknown fields) as decoding would: the copy belongs
// to the caller, like a decoded one, and marshals to the same bytes.
func unaryResponse(d *decodedRecord, t protoreflect.MessageType, raw []byte) (proto.Message, error) {
	resp := t.New().Interface()
	if d == nil {
		return resp, proto.Unmarshal(raw, resp)
	}
	r := d.response.Load()
	if r == nil || r.msg.ProtoReflect().Descriptor() != t.Descriptor() {
		m := t.New().Interface()
		if err := proto.Unmarshal(raw, m); err != nil {
			return nil, err
		}
		r = &decodedResponse{msg: m}
		d.response.Store(r)
	}
	proto.Merge(resp, r.msg)
	return resp, nil
}
