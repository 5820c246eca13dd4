package idempotency

import (
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	spb "google.golang.org/genproto/googleapis/rpc/status"

	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// marshalRecord returns rec's protobuf encoding: the bytes proto.Marshal
// makes, made without reflection, in one allocation of the exact size, as
// every first execution stores one. A record holding what only proto.Marshal
// handles (status details, unknown fields, a string that is not valid UTF-8,
// which proto.Marshal refuses) goes to proto.Marshal.
func marshalRecord(rec *Record) ([]byte, error) {
	n, ok := recordSize(rec)
	if !ok {
		return proto.Marshal(rec)
	}
	b := appendRecord(make([]byte, 0, n), rec)
	if len(b) != n {
		return proto.Marshal(rec) // cannot happen: the sizes are the encoder's
	}
	return b, nil
}

// Field numbers of Record, google.rpc.Status, Metadata and Timestamp.
const (
	recMethod, recFingerprint, recStatus, recHeader, recTrailer, recResponses = 1, 2, 3, 4, 5, 6
	recCreated, recExpires, recRequestsRead, recRequestsClosed, recOmitted    = 7, 8, 9, 10, 11

	statusCode, statusMessage = 1, 2
	mdKey, mdValues           = 1, 2
	tsSeconds, tsNanos        = 1, 2
)

func sizeString(num protowire.Number, s string) int {
	if s == "" {
		return 0
	}
	return protowire.SizeTag(num) + protowire.SizeBytes(len(s))
}

func sizeVarint(num protowire.Number, v uint64) int {
	if v == 0 {
		return 0
	}
	return protowire.SizeTag(num) + protowire.SizeVarint(v)
}

func sizeMessage(num protowire.Number, n int) int {
	return protowire.SizeTag(num) + protowire.SizeBytes(n)
}

// The sizes of the messages a Record holds, ok false when one holds what
// appendRecord does not encode.

func statusSize(s *spb.Status) (int, bool) {
	if len(s.Details) > 0 || len(s.ProtoReflect().GetUnknown()) > 0 || !utf8.ValidString(s.Message) {
		return 0, false
	}
	return sizeVarint(statusCode, uint64(s.Code)) + sizeString(statusMessage, s.Message), true
}

func timestampSize(t *timestamppb.Timestamp) (int, bool) {
	if len(t.ProtoReflect().GetUnknown()) > 0 {
		return 0, false
	}
	return sizeVarint(tsSeconds, uint64(t.Seconds)) + sizeVarint(tsNanos, uint64(t.Nanos)), true
}

func metadataSize(m *idempotencyv1.Metadata) (int, bool) {
	if len(m.ProtoReflect().GetUnknown()) > 0 || !utf8.ValidString(m.Key) {
		return 0, false
	}
	n := sizeString(mdKey, m.Key)
	for _, v := range m.Values {
		n += protowire.SizeTag(mdValues) + protowire.SizeBytes(len(v))
	}
	return n, true
}

func recordSize(rec *Record) (int, bool) {
	if len(rec.ProtoReflect().GetUnknown()) > 0 || !utf8.ValidString(rec.Method) || !utf8.ValidString(rec.Omitted) {
		return 0, false
	}
	n := sizeString(recMethod, rec.Method)
	if len(rec.Fingerprint) > 0 {
		n += protowire.SizeTag(recFingerprint) + protowire.SizeBytes(len(rec.Fingerprint))
	}
	if rec.Status != nil {
		m, ok := statusSize(rec.Status)
		if !ok {
			return 0, false
		}
		n += sizeMessage(recStatus, m)
	}
	for _, md := range [2][]*idempotencyv1.Metadata{rec.Header, rec.Trailer} {
		for _, e := range md {
			m, ok := metadataSize(e)
			if !ok {
				return 0, false
			}
			n += sizeMessage(recHeader, m) // recTrailer's tag is as long
		}
	}
	for _, r := range rec.Responses {
		n += protowire.SizeTag(recResponses) + protowire.SizeBytes(len(r))
	}
	for _, t := range [2]*timestamppb.Timestamp{rec.CreatedAt, rec.ExpiresAt} {
		if t != nil {
			m, ok := timestampSize(t)
			if !ok {
				return 0, false
			}
			n += sizeMessage(recCreated, m)
		}
	}
	n += sizeVarint(recRequestsRead, uint64(rec.RequestsRead))
	if rec.RequestsClosed {
		n += protowire.SizeTag(recRequestsClosed) + 1
	}
	return n + sizeString(recOmitted, rec.Omitted), true
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	if s == "" {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func appendVarint(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

func appendMessageHeader(b []byte, num protowire.Number, n int) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendVarint(b, uint64(n))
}

// appendRecord appends rec's encoding, whose recordSize was ok, in field
// number order, as proto.Marshal writes a generated message.
func appendRecord(b []byte, rec *Record) []byte {
	b = appendString(b, recMethod, rec.Method)
	if len(rec.Fingerprint) > 0 {
		b = protowire.AppendTag(b, recFingerprint, protowire.BytesType)
		b = protowire.AppendBytes(b, rec.Fingerprint)
	}
	if s := rec.Status; s != nil {
		n, _ := statusSize(s)
		b = appendMessageHeader(b, recStatus, n)
		b = appendVarint(b, statusCode, uint64(s.Code))
		b = appendString(b, statusMessage, s.Message)
	}
	b = appendMetadata(b, recHeader, rec.Header)
	b = appendMetadata(b, recTrailer, rec.Trailer)
	for _, r := range rec.Responses {
		b = protowire.AppendTag(b, recResponses, protowire.BytesType)
		b = protowire.AppendBytes(b, r)
	}
	b = appendTimestamp(b, recCreated, rec.CreatedAt)
	b = appendTimestamp(b, recExpires, rec.ExpiresAt)
	b = appendVarint(b, recRequestsRead, uint64(rec.RequestsRead))
	if rec.RequestsClosed {
		b = protowire.AppendTag(b, recRequestsClosed, protowire.VarintType)
		b = append(b, 1)
	}
	return appendString(b, recOmitted, rec.Omitted)
}

func appendMetadata(b []byte, num protowire.Number, md []*idempotencyv1.Metadata) []byte {
	for _, e := range md {
		n, _ := metadataSize(e)
		b = appendMessageHeader(b, num, n)
		b = appendString(b, mdKey, e.Key)
		for _, v := range e.Values {
			b = protowire.AppendTag(b, mdValues, protowire.BytesType)
			b = protowire.AppendBytes(b, v)
		}
	}
	return b
}

func appendTimestamp(b []byte, num protowire.Number, t *timestamppb.Timestamp) []byte {
	if t == nil {
		return b
	}
	n, _ := timestampSize(t)
	b = appendMessageHeader(b, num, n)
	b = appendVarint(b, tsSeconds, uint64(t.Seconds))
	return appendVarint(b, tsNanos, uint64(int64(t.Nanos)))
}
