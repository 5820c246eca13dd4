package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	// The standard error details (google.rpc.BadRequest, RetryInfo, ...),
	// so that show prints a status's details as JSON.
	_ "google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/dynamicpb"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/grpcidem/idempotency"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// recordJSON is what show -json prints: the whole record, one object.
type recordJSON struct {
	Scope          string              `json:"scope"`
	Key            string              `json:"key"`
	Method         string              `json:"method"`
	Status         statusJSON          `json:"status"`
	Header         map[string][]string `json:"header"`
	Trailer        map[string][]string `json:"trailer"`
	Responses      []payload           `json:"responses"`
	CreatedAt      string              `json:"createdAt"`
	ExpiresAt      string              `json:"expiresAt"`
	Fingerprint    string              `json:"fingerprint"` // hex
	RequestsRead   int64               `json:"requestsRead,omitempty"`
	RequestsClosed bool                `json:"requestsClosed,omitempty"`
	Omitted        string              `json:"omitted,omitempty"` // why only the status was stored
}

type statusJSON struct {
	Code     uint32 `json:"code"`
	CodeName string `json:"codeName"`
	Message  string `json:"message"`
	// Details are the protojson of each google.protobuf.Any when its type
	// is linked into this tool ({"@type": ..., fields}); otherwise a payload
	// with "@type" set to the Any's type URL.
	Details []json.RawMessage `json:"details"`
}

// payload is a marshalled message (a response, or a status detail's value),
// decoded as far as this tool can: as its type when the type is linked in,
// else as bare wire fields.
type payload struct {
	TypeURL string          `json:"@type,omitempty"` // a status detail's, when its type is unknown
	Type    string          `json:"type,omitempty"`  // the message's full name, when known
	Size    int             `json:"size"`
	Message json.RawMessage `json:"message,omitempty"` // protojson, when the type is known
	// Unknown holds the fields the known type does not define.
	Unknown []wireField `json:"unknownFields,omitempty"`
	// Wire holds the fields when the type is not known.
	Wire []wireField `json:"wire,omitempty"`
	// Note says why the type is not known, or why the bytes could not be
	// decoded with it.
	Note  string `json:"note,omitempty"`
	Bytes []byte `json:"bytes"` // base64: the bytes as stored
	human []byte // the message's protojson, indented, for the human form
}

// wireField is a protobuf field decoded without its message's definition.
type wireField struct {
	Field protowire.Number `json:"field"`
	Wire  string           `json:"wire"`            // varint, fixed32, fixed64, bytes or group
	Value *uint64          `json:"value,omitempty"` // varint, fixed32, fixed64
	// A bytes field is a string when it is valid UTF-8 (and printable, or
	// not a message), else a message when it parses as one, else bytes.
	String  *string     `json:"string,omitempty"`
	Message []wireField `json:"message,omitempty"` // a bytes field that parses as a message, or a group
	Bytes   []byte      `json:"bytes,omitempty"`   // base64
}

// maxWireDepth bounds how deep parseWire looks for nested messages.
const maxWireDepth = 32

// parseWire decodes b as a protobuf message's wire fields. ok is false when
// b is not well-formed wire data.
func parseWire(b []byte, depth int) (fields []wireField, ok bool) {
	if depth > maxWireDepth {
		return nil, false
	}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || num > protowire.MaxValidNumber {
			return nil, false
		}
		b = b[n:]
		f := wireField{Field: num}
		switch typ {
		case protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			f.Wire, f.Value, n = "varint", &v, m
		case protowire.Fixed32Type:
			v, m := protowire.ConsumeFixed32(b)
			u := uint64(v)
			f.Wire, f.Value, n = "fixed32", &u, m
		case protowire.Fixed64Type:
			v, m := protowire.ConsumeFixed64(b)
			f.Wire, f.Value, n = "fixed64", &v, m
		case protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m >= 0 {
				f.setBytes(v, depth)
			}
			f.Wire, n = "bytes", m
		case protowire.StartGroupType:
			v, m := protowire.ConsumeGroup(num, b)
			if m >= 0 {
				sub, ok := parseWire(v, depth+1)
				if !ok {
					return nil, false
				}
				f.Message = sub
			}
			f.Wire, n = "group", m
		default: // an end group without its start, or no wire type at all
			return nil, false
		}
		if n < 0 {
			return nil, false
		}
		b = b[n:]
		fields = append(fields, f)
	}
	return fields, true
}

// setBytes sets the value of a bytes field: a string when it reads as text,
// a message when it parses as one, else bytes. Text comes first, since short
// strings often happen to parse as messages, and messages seldom consist of
// printable characters only.
func (f *wireField) setBytes(v []byte, depth int) {
	if printable(v) {
		s := string(v)
		f.String = &s
		return
	}
	if sub, ok := parseWire(v, depth+1); ok {
		f.Message = sub
		return
	}
	if utf8.Valid(v) {
		s := string(v)
		f.String = &s
		return
	}
	f.Bytes = v
}

// printable reports whether b is valid UTF-8 with no control characters.
func printable(b []byte) bool {
	for len(b) > 0 {
		r, n := utf8.DecodeRune(b)
		if r == utf8.RuneError && n <= 1 || !unicode.IsPrint(r) && r != ' ' {
			return false
		}
		b = b[n:]
	}
	return true
}

// printWire prints fields one a line, nested messages indented.
func printWire(w io.Writer, fields []wireField, indent string) {
	for _, f := range fields {
		head := fmt.Sprintf("%s%d (%s):", indent, f.Field, f.Wire)
		switch {
		case f.Message != nil:
			fmt.Fprintf(w, "%s {\n", head)
			printWire(w, f.Message, indent+"  ")
			fmt.Fprintf(w, "%s}\n", indent)
		case f.String != nil:
			fmt.Fprintf(w, "%s %s\n", head, strconv.Quote(*f.String))
		case f.Bytes != nil:
			fmt.Fprintf(w, "%s %d bytes %x\n", head, len(f.Bytes), f.Bytes)
		case f.Wire == "group":
			fmt.Fprintf(w, "%s {}\n", head)
		case f.Wire == "varint":
			v := *f.Value
			if int64(v) < 0 {
				fmt.Fprintf(w, "%s %d (int64 %d)\n", head, v, int64(v))
			} else {
				fmt.Fprintf(w, "%s %d\n", head, v)
			}
		case f.Wire == "fixed32":
			v := uint32(*f.Value)
			fmt.Fprintf(w, "%s %d (0x%08x, float %g)\n", head, v, v, math.Float32frombits(v))
		case f.Wire == "fixed64":
			v := *f.Value
			fmt.Fprintf(w, "%s %d (0x%016x, double %g)\n", head, v, v, math.Float64frombits(v))
		}
	}
}

// responseType returns the message type of method's responses, when this
// binary links in the definition of method's service.
func responseType(method string) (protoreflect.MessageType, error) {
	service, name, ok := strings.Cut(strings.TrimPrefix(method, "/"), "/")
	if !ok || service == "" || name == "" || !strings.HasPrefix(method, "/") {
		return nil, fmt.Errorf("%q is not a gRPC method name", method)
	}
	d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(service))
	if err != nil {
		return nil, fmt.Errorf("service %s is not linked into this tool", service)
	}
	sd, ok := d.(protoreflect.ServiceDescriptor)
	if !ok {
		return nil, fmt.Errorf("%s is not a service", service)
	}
	md := sd.Methods().ByName(protoreflect.Name(name))
	if md == nil {
		return nil, fmt.Errorf("service %s has no method %s", service, name)
	}
	if mt, err := protoregistry.GlobalTypes.FindMessageByName(md.Output().FullName()); err == nil {
		return mt, nil
	}
	return dynamicpb.NewMessageType(md.Output()), nil
}

// decodePayload decodes b as a message of type mt, or, when mt is nil (with
// why it is), as bare wire fields.
func decodePayload(b []byte, mt protoreflect.MessageType, why error) payload {
	p := payload{Size: len(b), Bytes: b}
	if mt != nil {
		m := mt.New().Interface()
		err := proto.Unmarshal(b, m)
		var js []byte
		if err == nil {
			js, err = protojson.Marshal(m)
		}
		if err == nil {
			p.Type, p.Message = string(mt.Descriptor().FullName()), js
			p.human = indentJSON(js, "  ")
			if unknown := m.ProtoReflect().GetUnknown(); len(unknown) > 0 {
				p.Unknown, _ = parseWire(unknown, 0)
			}
			return p
		}
		why = fmt.Errorf("does not decode as %s: %v", mt.Descriptor().FullName(), err)
	}
	p.Note = why.Error()
	p.Wire, _ = parseWire(b, 0)
	return p
}

// indentJSON indents compact (or randomly spaced: protojson's) JSON
// stably, each line after the first prefixed.
func indentJSON(js []byte, prefix string) []byte {
	var b bytes.Buffer
	if err := json.Indent(&b, js, prefix, "  "); err != nil {
		return js
	}
	return b.Bytes()
}

// print prints p under its heading line, which says what the bytes are,
// and why they are not decoded as their type unless that was said already.
func (p payload) print(w io.Writer, heading, said string) {
	head := fmt.Sprintf("%s  %d bytes", heading, p.Size)
	if p.Message != nil {
		fmt.Fprintf(w, "%s of %s:\n  %s\n", head, p.Type, p.human)
		if len(p.Unknown) > 0 {
			fmt.Fprintf(w, "  fields %s does not define:\n", p.Type)
			printWire(w, p.Unknown, "    ")
		}
		return
	}
	if p.Note != "" && p.Note != said {
		head += " (" + p.Note + ")"
	}
	switch {
	case p.Size == 0:
		fmt.Fprintf(w, "%s: an empty message\n", head)
	case p.Wire != nil:
		fmt.Fprintf(w, "%s, wire fields:\n", head)
		printWire(w, p.Wire, "  ")
	case utf8.Valid(p.Bytes):
		fmt.Fprintf(w, "%s, not a protobuf message: %q\n", head, p.Bytes)
	default:
		fmt.Fprintf(w, "%s, not a protobuf message: %x\n", head, p.Bytes)
	}
}

// detail decodes a status detail: the Any's protojson when its type is
// linked in, else its value's wire fields.
func detail(d *anypb.Any) (js []byte, p payload, known bool) {
	if js, err := protojson.Marshal(d); err == nil {
		return js, payload{}, true
	}
	p = decodePayload(d.GetValue(), nil, errors.New("its type is not linked into this tool"))
	p.TypeURL = d.GetTypeUrl()
	return nil, p, false
}

// metadataJSON is md as a map, -bin values in base64 as gRPC sends them.
func metadataJSON(md []*idempotencyv1.Metadata) map[string][]string {
	m := make(map[string][]string, len(md))
	for _, kv := range md {
		for _, v := range kv.Values {
			m[kv.Key] = append(m[kv.Key], metadataValue(kv.Key, v, false))
		}
	}
	return m
}

// metadataValue is v, base64 for a binary (-bin) key, else text (quoted if
// quote is set).
func metadataValue(key string, v []byte, quote bool) string {
	switch {
	case strings.HasSuffix(key, "-bin"):
		return base64.StdEncoding.EncodeToString(v)
	case quote:
		return strconv.Quote(string(v))
	}
	return string(v)
}

// printRecord prints the record of key in scope: for people, or as one JSON
// object (asJSON).
func printRecord(out io.Writer, scope, key string, e idempotency.Entry, asJSON bool) error {
	rec, err := decode(e)
	if err != nil {
		return err
	}
	mt, why := responseType(rec.Method)
	if why != nil {
		why = fmt.Errorf("the response type of %s is unknown: %v", rec.Method, why)
	}
	responses := make([]payload, len(rec.Responses))
	for i, r := range rec.Responses {
		responses[i] = decodePayload(r, mt, why)
	}
	st := rec.GetStatus()
	created := rec.GetCreatedAt().AsTime().UTC().Format(time.RFC3339Nano)
	expires := e.Expires.UTC().Format(time.RFC3339Nano)
	if asJSON {
		j := recordJSON{
			Scope: scope, Key: key, Method: rec.Method,
			Status: statusJSON{Code: uint32(st.GetCode()), CodeName: codes.Code(st.GetCode()).String(), Message: st.GetMessage(),
				Details: []json.RawMessage{}},
			Header: metadataJSON(rec.Header), Trailer: metadataJSON(rec.Trailer),
			Responses: responses,
			CreatedAt: created, ExpiresAt: expires,
			Fingerprint:  fmt.Sprintf("%x", rec.Fingerprint),
			RequestsRead: rec.RequestsRead, RequestsClosed: rec.RequestsClosed,
			Omitted: rec.Omitted,
		}
		for _, d := range st.GetDetails() {
			js, p, known := detail(d)
			if !known {
				if js, err = json.Marshal(p); err != nil {
					return err
				}
			}
			j.Status.Details = append(j.Status.Details, js)
		}
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(j)
	}

	fmt.Fprintf(out, "scope:       %q\nkey:         %q\nmethod:      %s\n", scope, key, rec.Method)
	fmt.Fprintf(out, "status:      %s %q\n", codes.Code(st.GetCode()), st.GetMessage())
	for i, d := range st.GetDetails() {
		heading := fmt.Sprintf("detail %d:    %s", i+1, d.GetTypeUrl())
		if js, p, known := detail(d); known {
			fmt.Fprintf(out, "%s\n  %s\n", heading, indentJSON(js, "  "))
		} else {
			p.print(out, heading, "")
		}
	}
	fmt.Fprintf(out, "created:     %s\nexpires:     %s\nfingerprint: %x\n", created, expires, rec.Fingerprint)
	for _, md := range rec.Header {
		fmt.Fprintf(out, "header:      %s: %s\n", md.Key, values(md.Key, md.Values))
	}
	for _, md := range rec.Trailer {
		fmt.Fprintf(out, "trailer:     %s: %s\n", md.Key, values(md.Key, md.Values))
	}
	if rec.RequestsRead > 0 {
		fmt.Fprintf(out, "requests:    %d read, end of stream read: %v\n", rec.RequestsRead, rec.RequestsClosed)
	}
	if rec.Omitted != "" {
		fmt.Fprintf(out, "omitted:     the outcome was too large to store (%s); duplicates get FailedPrecondition\n", rec.Omitted)
	}
	said := ""
	switch {
	case len(responses) == 0:
		fmt.Fprintln(out, "responses:   none")
	case why != nil:
		// Said once, not for each response of a stream.
		said = why.Error()
		fmt.Fprintf(out, "responses:   %d, as wire fields: %s\n", len(responses), said)
	}
	for i, p := range responses {
		p.print(out, fmt.Sprintf("response %d:", i+1), said)
	}
	return nil
}

// values is a metadata key's values for people: -bin ones in base64, as gRPC
// sends them, others quoted.
func values(key string, vs [][]byte) string {
	parts := make([]string, len(vs))
	for i, v := range vs {
		parts[i] = metadataValue(key, v, true)
	}
	return strings.Join(parts, ", ")
}
