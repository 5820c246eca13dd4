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

	// unary is what the unary replays of rec reuse, made on its second
	// replay (unaryReplayOf).
	unary atomic.Pointer[unaryReplay]
}

// decode returns the record stored as raw under key. again is its cache
// entry when the record was decoded before (a hit), nil the first time and
// for a record too large to keep: what replays reuse is made only for a
// record replayed more than once, so that one replay costs what decoding
// costs.
func (d *decodedRecords) decode(key string, raw []byte) (rec *Record, again *decodedRecord, err error) {
	slot := &d.slots[maphash.String(d.seed, key)%uint64(len(d.slots))]
	if c := slot.Load(); c != nil && c.key == key && bytes.Equal(c.raw, raw) {
		return c.rec, c, nil
	}
	rec = new(Record)
	if err := proto.Unmarshal(raw, rec); err != nil {
		return nil, nil, err
	}
	if len(raw) <= 16<<10 {
		slot.Store(&decodedRecord{key: key, raw: raw, rec: rec})
	}
	return rec, nil, nil
}

// unaryReplay is what every unary replay of a record sends alike, made once
// and then only read: its header (ReplayedHeader with the handler's) and
// trailer (nil if the handler set none), which grpc-go's SetHeader and
// SetTrailer copy (metadata.Join), as do this package's transportRecorder
// and the connect adapter; and its response, decoded, never handed out:
// each replay gets a copy (replayResponse).
type unaryReplay struct {
	header, trailer metadata.MD
	resp            proto.Message // nil without one (an error), or if it cannot be decoded
}

// unaryReplayOf returns what replays of d's record, a record of method,
// reuse; d is nil for a record not decoded before, and then so is the
// result.
func unaryReplayOf(d *decodedRecord, method string) *unaryReplay {
	if d == nil {
		return nil
	}
	if u := d.unary.Load(); u != nil {
		return u
	}
	rec := d.rec
	u := &unaryReplay{header: replayHeader(rec), trailer: replayTrailer(rec)}
	if rec.Omitted == "" && rec.GetStatus().GetCode() == int32(codes.OK) && len(rec.Responses) == 1 {
		if t, err := typesOf(method); err == nil {
			m := t.out.New().Interface()
			if proto.Unmarshal(rec.Responses[0], m) == nil {
				u.resp = m
			}
		}
	}
	d.unary.Store(u)
	return u
}

// replayResponse returns a new message of type t holding raw, a stored
// response; decoded is the same response decoded before (or nil).
//
// From decoded, the message is a copy made by proto.Merge: it shares the
// decoded strings (immutable) instead of allocating each of them again, and
// copies everything mutable (bytes, lists, maps, messages, unknown fields)
// as decoding does; so it belongs to the caller, like a decoded one, and
// marshals to the same bytes.
func replayResponse(t protoreflect.MessageType, raw []byte, decoded proto.Message) (proto.Message, error) {
	resp := t.New().Interface()
	if decoded != nil && decoded.ProtoReflect().Descriptor() == t.Descriptor() {
		proto.Merge(resp, decoded)
		return resp, nil
	}
	if err := proto.Unmarshal(raw, resp); err != nil {
		return nil, err
	}
	return resp, nil
}
