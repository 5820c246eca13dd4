package idempotency

import (
	"hash/maphash"
	"reflect"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	spb "google.golang.org/genproto/googleapis/rpc/status"

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

// A replayed response copied from the decoded one is what decoding the
// stored bytes gives, on every replay, and belongs to its caller: changing
// it in place changes neither the decoded one nor any later replay.
func TestReplayResponseIsADecodedCopy(t *testing.T) {
	for name, m := range replayResponses(t) {
		t.Run(name, func(t *testing.T) {
			typ := m.ProtoReflect().Type()
			raw, err := proto.Marshal(m)
			require.NoError(t, err)
			want := typ.New().Interface()
			require.NoError(t, proto.Unmarshal(raw, want))
			decoded := typ.New().Interface()
			require.NoError(t, proto.Unmarshal(raw, decoded))

			for round := range 4 {
				for _, from := range []proto.Message{decoded, nil} {
					got, err := replayResponse(typ, raw, from)
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
				require.True(t, proto.Equal(want, decoded), "round %d: the decoded response changed", round)
			}
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

// A decoded response of another type (which a record cannot have: its
// method is checked first) is not merged, which would panic: the stored
// bytes are decoded.
func TestReplayResponseOtherType(t *testing.T) {
	raw, err := proto.Marshal(&testpb.ChargeResponse{ChargeId: "ch_1"})
	require.NoError(t, err)
	got, err := replayResponse((&testpb.ChargeResponse{}).ProtoReflect().Type(), raw, &anypb.Any{TypeUrl: "x"})
	require.NoError(t, err)
	assert.Equal(t, "ch_1", got.(*testpb.ChargeResponse).ChargeId)
}

// What a replay of a response decoded before allocates: the message alone,
// not one string per string field.
func TestReplayResponseAllocations(t *testing.T) {
	m := &testpb.ChargeResponse{ChargeId: "ch_0123456789abcdef", Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	raw, err := proto.Marshal(m)
	require.NoError(t, err)
	typ := m.ProtoReflect().Type()
	decoded := typ.New().Interface()
	require.NoError(t, proto.Unmarshal(raw, decoded))
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := replayResponse(typ, raw, decoded); err != nil {
			t.Fatal(err)
		}
	})
	assert.Equal(t, 1.0, allocs)
}

// decode hands out a record's cache entry from its second decode on (a
// record replayed once costs no more than its decoding); other bytes under
// the key replace it, and a large record is never kept.
func TestDecodedRecordsAgain(t *testing.T) {
	d := &decodedRecords{seed: maphash.MakeSeed()}
	raw, err := proto.Marshal(&Record{Method: "/m", Responses: [][]byte{{0x0a, 0x01, 'x'}}})
	require.NoError(t, err)
	rec, again, err := d.decode("/k", raw)
	require.NoError(t, err)
	assert.Nil(t, again, "first decode")

	rec2, again, err := d.decode("/k", append([]byte(nil), raw...))
	require.NoError(t, err)
	require.NotNil(t, again)
	assert.Same(t, rec, rec2)
	assert.Same(t, rec, again.rec)
	rec3, again3, err := d.decode("/k", raw)
	require.NoError(t, err)
	assert.Same(t, rec, rec3)
	assert.Same(t, again, again3)

	other, err := proto.Marshal(&Record{Method: "/m", Responses: [][]byte{{0x0a, 0x01, 'y'}}})
	require.NoError(t, err)
	rec4, again4, err := d.decode("/k", other)
	require.NoError(t, err)
	assert.Nil(t, again4)
	assert.NotSame(t, rec, rec4)

	large, err := proto.Marshal(&Record{Method: "/m", Responses: [][]byte{make([]byte, 16<<10)}})
	require.NoError(t, err)
	for range 2 {
		rec, again, err := d.decode("/large", large)
		require.NoError(t, err)
		assert.NotNil(t, rec)
		assert.Nil(t, again)
	}

	_, _, err = d.decode("/corrupt", []byte{0x0a, 0x05, 'a'})
	require.Error(t, err)
}

// What unary replays of a record reuse is made once, and is what a replay
// makes afresh: the handler's header with ReplayedHeader, the handler's
// trailer (nil without one), and the response decoded (nil for an error, an
// omitted outcome, or bytes that cannot be decoded, which replays then
// decode and report).
func TestUnaryReplayOf(t *testing.T) {
	method := testpb.PaymentService_Charge_FullMethodName
	resp := &testpb.ChargeResponse{ChargeId: "ch_1", Account: "acct_1"}
	respBytes, err := proto.Marshal(resp)
	require.NoError(t, err)
	ok := &spb.Status{Code: int32(codes.OK)}
	rec := &Record{
		Method:    method,
		Status:    ok,
		Responses: [][]byte{respBytes},
		Header:    mdToRecord(metadata.Pairs("x-a", "1", "x-a", "2", "x-sig-bin", string([]byte{0, 0xff}))),
		Trailer:   mdToRecord(metadata.Pairs("x-ledger", "entry-1")),
	}
	d := &decodedRecord{rec: rec}
	u := unaryReplayOf(d, method)
	require.NotNil(t, u)
	assert.Same(t, u, unaryReplayOf(d, method), "made once")
	assert.Equal(t, metadata.Pairs("x-a", "1", "x-a", "2", "x-sig-bin", string([]byte{0, 0xff}), ReplayedHeader, "true"), u.header)
	assert.Equal(t, replayHeader(rec), u.header)
	assert.Equal(t, metadata.Pairs("x-ledger", "entry-1"), u.trailer)
	assert.Equal(t, replayTrailer(rec), u.trailer)
	assert.True(t, proto.Equal(resp, u.resp))
	assert.Nil(t, unaryReplayOf(nil, method))

	for name, rec := range map[string]*Record{
		"error":   {Method: method, Status: &spb.Status{Code: int32(codes.NotFound), Message: "no"}},
		"omitted": {Method: method, Status: ok, Omitted: "too large"},
		"corrupt": {Method: method, Status: ok, Responses: [][]byte{{0x0a, 0x05, 'a'}}},
	} {
		u := unaryReplayOf(&decodedRecord{rec: rec}, method)
		require.NotNil(t, u, name)
		assert.Equal(t, reflect.ValueOf(replayedOnly).Pointer(), reflect.ValueOf(u.header).Pointer(), name)
		assert.Nil(t, u.trailer, name)
		assert.Nil(t, u.resp, name)
	}
}

// BenchmarkReplayResponse compares the two ways a unary replay makes its
// response: decoding the stored bytes (a record's first and second replay)
// and copying the response decoded before (every later one).
//
//	go test -run '^$' -bench BenchmarkReplayResponse -benchmem -count 10 .
func BenchmarkReplayResponse(b *testing.B) {
	m := &testpb.ChargeResponse{ChargeId: "ch_0123456789abcdef", Account: "acct_1", AmountCents: 1250, Currency: "EUR"}
	raw, err := proto.Marshal(m)
	if err != nil {
		b.Fatal(err)
	}
	typ := m.ProtoReflect().Type()
	decoded := typ.New().Interface()
	if err := proto.Unmarshal(raw, decoded); err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		from proto.Message
	}{{"decode", nil}, {"copy", decoded}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := replayResponse(typ, raw, c.from); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
