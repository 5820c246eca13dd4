package idempotency

import (
	"hash/maphash"
	"reflect"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	testpb "github.com/grpcidem/idempotency/internal/testpb"
)

// replayResponses are responses with every kind of field a copy could share
// by mistake: strings, bytes, lists, maps, nested messages, proto2 presence,
// and fields this binary does not know (unknown fields).
func replayResponses(t *testing.T) map[string]proto.Message {
	t.Helper()
	nested, err := structpb.NewStruct(map[string]any{
		"id": "ch_1", "amount": 1250.0, "ok": true, "none": nil,
		"tags":  []any{"a", "b", map[string]any{"deep": "x"}},
		"inner": map[string]any{"list": []any{1.0, "two"}},
	})
	require.NoError(t, err)
	withUnknown := &testpb.ChargeResponse{ChargeId: "ch_0123456789abcdef", Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	var unknown []byte
	unknown = protowire.AppendTag(unknown, 99, protowire.BytesType)
	unknown = protowire.AppendBytes(unknown, []byte("from a newer schema"))
	unknown = protowire.AppendTag(unknown, 100, protowire.VarintType)
	unknown = protowire.AppendVarint(unknown, 7)
	withUnknown.ProtoReflect().SetUnknown(unknown)
	return map[string]proto.Message{
		"strings":  &testpb.ChargeResponse{ChargeId: "ch_0123456789abcdef", Account: "acct_1", AmountCents: 1250, Currency: "EUR"},
		"empty":    &testpb.ChargeResponse{},
		"lists":    &testpb.BatchResponse{Charges: []*testpb.ChargeResponse{{ChargeId: "a", AmountCents: 1}, {ChargeId: "b", Currency: "EUR"}}},
		"bytes":    &anypb.Any{TypeUrl: "type.googleapis.com/x", Value: []byte{0, 1, 2, 0xfe, 0xff}},
		"maps":     nested,
		"proto2":   protodesc.ToFileDescriptorProto(testpb.File_idempotency_testing_v1_service_proto),
		"unknown":  withUnknown,
		"defaults": &descriptorpb.FieldOptions{Packed: proto.Bool(false), Deprecated: proto.Bool(false)},
	}
}

// A replayed response, copied from the decoded template, is what decoding
// the stored bytes gives, on the first replay and every later one, and
// belongs to its caller: changing it in place changes no later replay.
func TestUnaryResponseIsADecodedCopy(t *testing.T) {
	for name, m := range replayResponses(t) {
		t.Run(name, func(t *testing.T) {
			raw, err := proto.Marshal(m)
			require.NoError(t, err)
			want := m.ProtoReflect().Type().New().Interface()
			require.NoError(t, proto.Unmarshal(raw, want))

			d := &decodedRecord{}
			for round := range 4 {
				got, err := unaryResponse(d, m.ProtoReflect().Type(), raw)
				require.NoError(t, err)
				require.True(t, proto.Equal(want, got), "round %d: %v, want %v", round, got, want)
				assert.Equal(t, mustMarshalDet(t, want), mustMarshalDet(t, got), "round %d", round)
				assert.Equal(t, want.ProtoReflect().GetUnknown(), got.ProtoReflect().GetUnknown(), "round %d", round)
				if _, isStruct := m.(*structpb.Struct); !isStruct {
					// Without maps, the default encoding is one: the
					// bytes grpc-go sends are the stored ones.
					b, err := proto.Marshal(got)
					require.NoError(t, err)
					assert.Equal(t, raw, b, "round %d", round)
				}
				scribble(got)
			}
			nilD, err := unaryResponse(nil, m.ProtoReflect().Type(), raw)
			require.NoError(t, err)
			assert.True(t, proto.Equal(want, nilD))
		})
	}
}

// scribble changes m in place every way a caller could: the bytes of its
// bytes fields and unknown fields, its lists, maps and nested messages.
func scribble(m proto.Message) {
	switch m := m.(type) {
	case *testpb.ChargeResponse:
		if u := m.ProtoReflect().GetUnknown(); len(u) > 0 {
			u[len(u)-1] ^= 0xff
		}
		m.ChargeId, m.AmountCents = "changed", -1
	case *testpb.BatchResponse:
		m.Charges[0].ChargeId = "changed"
		m.Charges = append(m.Charges[:1], &testpb.ChargeResponse{})
	case *anypb.Any:
		m.Value[0] = 0x55
	case *structpb.Struct:
		m.Fields["tags"].GetListValue().Values[2].GetStructValue().Fields["deep"] = structpb.NewStringValue("changed")
		m.Fields["added"] = structpb.NewNullValue()
		delete(m.Fields, "id")
	case *descriptorpb.FileDescriptorProto:
		m.MessageType[0].Name = proto.String("Changed")
		m.MessageType[0].Field = m.MessageType[0].Field[:0]
		m.Options = nil
	case *descriptorpb.FieldOptions:
		*m.Packed = true
		m.Deprecated = nil
	}
}

func mustMarshalDet(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	require.NoError(t, err)
	return b
}

// A stored response that cannot be decoded is an error on every replay,
// and is not kept.
func TestUnaryResponseCorrupt(t *testing.T) {
	typ := (&testpb.ChargeResponse{}).ProtoReflect().Type()
	corrupt := []byte{0x0a, 0x05, 'a'} // a string field cut short
	d := &decodedRecord{}
	for range 2 {
		_, err := unaryResponse(d, typ, corrupt)
		require.Error(t, err)
		assert.Nil(t, d.response.Load())
	}
	_, err := unaryResponse(nil, typ, corrupt)
	require.Error(t, err)
}

// A template of another type (which a record cannot have: its method is
// checked first) is replaced, not merged, which would panic.
func TestUnaryResponseOtherType(t *testing.T) {
	raw, err := proto.Marshal(&testpb.ChargeResponse{ChargeId: "ch_1"})
	require.NoError(t, err)
	d := &decodedRecord{}
	d.response.Store(&decodedResponse{msg: &anypb.Any{TypeUrl: "x"}})
	got, err := unaryResponse(d, (&testpb.ChargeResponse{}).ProtoReflect().Type(), raw)
	require.NoError(t, err)
	assert.Equal(t, "ch_1", got.(*testpb.ChargeResponse).ChargeId)
}

// What the replay of a kept record's response allocates, once decoded: the
// message alone, not one string per string field.
func TestUnaryResponseAllocations(t *testing.T) {
	m := &testpb.ChargeResponse{ChargeId: "ch_0123456789abcdef", Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	raw, err := proto.Marshal(m)
	require.NoError(t, err)
	typ := m.ProtoReflect().Type()
	d := &decodedRecord{}
	_, err = unaryResponse(d, typ, raw)
	require.NoError(t, err)
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := unaryResponse(d, typ, raw); err != nil {
			t.Fatal(err)
		}
	})
	assert.Equal(t, 1.0, allocs)
}

// decode keeps a record small enough, and hands out the same entry (with
// its decoded response) for the same key and bytes; another record under
// the key replaces it, and a large record is decoded but not kept.
func TestDecodedRecordsKeepResponses(t *testing.T) {
	d := &decodedRecords{seed: maphash.MakeSeed()}
	raw, err := proto.Marshal(&Record{Method: "/m", Responses: [][]byte{{0x0a, 0x01, 'x'}}})
	require.NoError(t, err)
	rec, kept, err := d.decode("/k", raw)
	require.NoError(t, err)
	require.NotNil(t, kept)
	assert.Same(t, rec, kept.rec)
	_, err = unaryResponse(kept, (&testpb.ChargeResponse{}).ProtoReflect().Type(), rec.Responses[0])
	require.NoError(t, err)

	rec2, kept2, err := d.decode("/k", append([]byte(nil), raw...))
	require.NoError(t, err)
	assert.Same(t, kept, kept2)
	assert.Same(t, rec, rec2)
	assert.NotNil(t, kept2.response.Load())

	other, err := proto.Marshal(&Record{Method: "/m", Responses: [][]byte{{0x0a, 0x01, 'y'}}})
	require.NoError(t, err)
	_, kept3, err := d.decode("/k", other)
	require.NoError(t, err)
	assert.NotSame(t, kept, kept3)
	assert.Nil(t, kept3.response.Load())

	large, err := proto.Marshal(&Record{Method: "/m", Responses: [][]byte{make([]byte, 16<<10)}})
	require.NoError(t, err)
	rec4, kept4, err := d.decode("/large", large)
	require.NoError(t, err)
	assert.NotNil(t, rec4)
	assert.Nil(t, kept4)
}

// A kept record's replay header and trailer are made once, and are what a
// record not kept gets made afresh: the handler's header with
// ReplayedHeader, the handler's trailer, nil when it set none.
func TestUnaryMetadata(t *testing.T) {
	rec := &Record{
		Header:  mdToRecord(metadata.Pairs("x-a", "1", "x-a", "2", "x-sig-bin", string([]byte{0, 0xff}))),
		Trailer: mdToRecord(metadata.Pairs("x-ledger", "entry-1")),
	}
	wantHeader := metadata.Pairs("x-a", "1", "x-a", "2", "x-sig-bin", string([]byte{0, 0xff}), ReplayedHeader, "true")
	wantTrailer := metadata.Pairs("x-ledger", "entry-1")

	d := &decodedRecord{rec: rec}
	h1, t1 := unaryMetadata(d, rec)
	h2, t2 := unaryMetadata(d, rec)
	assert.Equal(t, wantHeader, h1)
	assert.Equal(t, wantTrailer, t1)
	assert.Equal(t, reflect.ValueOf(h1).Pointer(), reflect.ValueOf(h2).Pointer(), "made once")
	assert.Equal(t, reflect.ValueOf(t1).Pointer(), reflect.ValueOf(t2).Pointer(), "made once")
	h, tr := unaryMetadata(nil, rec)
	assert.Equal(t, wantHeader, h)
	assert.Equal(t, wantTrailer, tr)

	bare := &Record{}
	for _, d := range []*decodedRecord{nil, {rec: bare}} {
		h, tr := unaryMetadata(d, bare)
		assert.Equal(t, metadata.Pairs(ReplayedHeader, "true"), h)
		assert.Nil(t, tr)
	}
}
