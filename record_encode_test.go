package idempotency

import (
	"bytes"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	spb "google.golang.org/genproto/googleapis/rpc/status"

	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// marshalRecord must write exactly what proto.Marshal writes, for every
// record: stores compare nothing, but a record is read back by proto.Unmarshal
// and older versions of the module.
func TestMarshalRecordIsProtoMarshal(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	str := func() string {
		switch r.IntN(4) {
		case 0:
			return ""
		case 1:
			return strings.Repeat("é", r.IntN(200))
		default:
			return strings.Repeat("x", r.IntN(300))
		}
	}
	bs := func() []byte {
		if r.IntN(5) == 0 {
			return nil
		}
		b := make([]byte, r.IntN(400))
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	i64 := func() int64 {
		switch r.IntN(5) {
		case 0:
			return 0
		case 1:
			return -r.Int64()
		case 2:
			return math.MaxInt64
		default:
			return r.Int64N(1 << 40)
		}
	}
	ts := func() *timestamppb.Timestamp {
		if r.IntN(4) == 0 {
			return nil
		}
		return &timestamppb.Timestamp{Seconds: i64(), Nanos: int32(i64())}
	}
	md := func() []*idempotencyv1.Metadata {
		var out []*idempotencyv1.Metadata
		for range r.IntN(4) {
			m := &idempotencyv1.Metadata{Key: str()}
			for range r.IntN(4) {
				m.Values = append(m.Values, bs())
			}
			out = append(out, m)
		}
		return out
	}
	for i := range 5000 {
		rec := &Record{Method: str(), Fingerprint: bs(), Header: md(), Trailer: md(), CreatedAt: ts(), ExpiresAt: ts(),
			RequestsRead: i64(), RequestsClosed: r.IntN(2) == 0, Omitted: str()}
		if r.IntN(5) != 0 {
			rec.Status = &spb.Status{Code: int32(i64()), Message: str()}
		}
		for range r.IntN(4) {
			rec.Responses = append(rec.Responses, bs())
		}
		n, ok := recordSize(rec)
		if !ok {
			t.Fatalf("record %d: not encoded without proto.Marshal: %v", i, rec)
		}
		got := appendRecord(nil, rec)
		if len(got) != n {
			t.Fatalf("record %d: recordSize %d, appendRecord wrote %d bytes", i, n, len(got))
		}
		want, err := proto.Marshal(rec)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("record %d: marshalRecord wrote\n%x\nproto.Marshal\n%x\nrecord: %v", i, got, want, rec)
		}
	}
}

// What the fast encoder leaves to proto.Marshal comes out as proto.Marshal
// makes it, errors included.
func TestMarshalRecordFallsBack(t *testing.T) {
	detail, err := anypb.New(&idempotencyv1.Metadata{Key: "k"})
	if err != nil {
		t.Fatal(err)
	}
	withUnknown := &Record{Method: "/s/M"}
	withUnknown.ProtoReflect().SetUnknown([]byte{0xf8, 0x06, 0x01}) // field 111, varint 1
	for name, rec := range map[string]*Record{
		"details":     {Method: "/s/M", Status: &spb.Status{Code: 3, Message: "bad", Details: []*anypb.Any{detail}}},
		"unknown":     withUnknown,
		"bad-utf8":    {Method: "/s/M", Status: &spb.Status{Code: 3, Message: "caf\xe9"}},
		"bad-md-key":  {Method: "/s/M", Header: []*idempotencyv1.Metadata{{Key: "\xff"}}},
		"bad-omitted": {Method: "/s/M", Omitted: "\xff"},
		"bad-method":  {Method: "\xff"},
	} {
		got, gotErr := marshalRecord(rec)
		want, wantErr := proto.Marshal(rec)
		if !bytes.Equal(got, want) || (gotErr == nil) != (wantErr == nil) {
			t.Errorf("%s: marshalRecord = %x, %v; proto.Marshal = %x, %v", name, got, gotErr, want, wantErr)
		}
	}
}
