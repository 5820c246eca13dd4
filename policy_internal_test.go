package idempotency

import (
	"context"
	"fmt"
	"math/rand/v2"
	"regexp"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/known/durationpb"

	testpb "github.com/grpcidem/idempotency/internal/testpb"
	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// badFile is a .proto file, built in memory, whose idempotency options the
// server cannot honour.
func badFile(t *testing.T) protoreflect.FileDescriptor {
	t.Helper()
	field := func(name string, num int32, typ descriptorpb.FieldDescriptorProto_Type, fp *idempotencyv1.FieldPolicy) *descriptorpb.FieldDescriptorProto {
		f := &descriptorpb.FieldDescriptorProto{
			Name: proto.String(name), Number: proto.Int32(num), Type: typ.Enum(),
			Label: descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum(), JsonName: proto.String(name),
		}
		if fp != nil {
			f.Options = &descriptorpb.FieldOptions{}
			proto.SetExtension(f.Options, idempotencyv1.E_Field, fp)
		}
		return f
	}
	key := &idempotencyv1.FieldPolicy{Key: true}
	method := func(name, in string, mp *idempotencyv1.MethodPolicy) *descriptorpb.MethodDescriptorProto {
		m := &descriptorpb.MethodDescriptorProto{Name: proto.String(name), InputType: proto.String(".bad.v1." + in), OutputType: proto.String(".bad.v1.Ok"), Options: &descriptorpb.MethodOptions{}}
		proto.SetExtension(m.Options, idempotencyv1.E_Method, mp)
		return m
	}
	fdp := &descriptorpb.FileDescriptorProto{
		Name:       proto.String("bad/v1/bad.proto"),
		Package:    proto.String("bad.v1"),
		Syntax:     proto.String("proto3"),
		Dependency: []string{"idempotency/v1/options.proto"},
		MessageType: []*descriptorpb.DescriptorProto{
			{Name: proto.String("Ok"), Field: []*descriptorpb.FieldDescriptorProto{field("request_id", 1, descriptorpb.FieldDescriptorProto_TYPE_STRING, key)}},
			{Name: proto.String("IntKey"), Field: []*descriptorpb.FieldDescriptorProto{field("request_id", 1, descriptorpb.FieldDescriptorProto_TYPE_INT64, key)}},
			{Name: proto.String("TwoKeys"), Field: []*descriptorpb.FieldDescriptorProto{
				field("a", 1, descriptorpb.FieldDescriptorProto_TYPE_STRING, key),
				field("b", 2, descriptorpb.FieldDescriptorProto_TYPE_STRING, key),
			}},
		},
		Service: []*descriptorpb.ServiceDescriptorProto{{
			Name: proto.String("Bad"),
			Method: []*descriptorpb.MethodDescriptorProto{
				method("ShortRetention", "Ok", &idempotencyv1.MethodPolicy{Retention: durationpb.New(1)}),
				method("IntKey", "IntKey", &idempotencyv1.MethodPolicy{Participation: idempotencyv1.Participation_PARTICIPATION_KEY_REQUIRED}),
				method("TwoKeys", "TwoKeys", &idempotencyv1.MethodPolicy{}),
				method("Fine", "Ok", &idempotencyv1.MethodPolicy{Participation: idempotencyv1.Participation_PARTICIPATION_KEY_REQUIRED}),
			},
		}},
	}
	fd, err := protodesc.NewFile(fdp, protoregistry.GlobalFiles)
	require.NoError(t, err)
	return fd
}

// Options the server cannot honour stop NewServer (here, checkDeclared on
// a registry that holds them), and fail the method's calls with Internal
// rather than run them unguarded.
func TestDeclaredOptionsAreChecked(t *testing.T) {
	fd := badFile(t)
	files := new(protoregistry.Files)
	require.NoError(t, files.RegisterFile(fd))
	err := checkDeclared(files)
	require.Error(t, err)
	for _, want := range []string{
		"retention of bad.v1.Bad.ShortRetention is 1ns; use 10ms to 87600h0m0s",
		"bad.v1.IntKey.request_id is marked (idempotency.v1.field).key, but it is a int64 field; a key field is a string",
		"bad.v1.TwoKeys has 2 fields marked (idempotency.v1.field).key",
	} {
		assert.Contains(t, err.Error(), want)
	}
	assert.NotContains(t, err.Error(), "Fine")
	require.NoError(t, checkDeclared(protoregistry.GlobalFiles), "the linked-in protos are fine")

	methods := fd.Services().Get(0).Methods()
	assert.ErrorContains(t, declare(methods.ByName("IntKey")).keyErr, "a key field is a string")
	assert.ErrorContains(t, declare(methods.ByName("TwoKeys")).keyErr, "two fields marked")
	assert.ErrorContains(t, declare(methods.ByName("ShortRetention")).retentionErr, "is 1ns")
	d := declare(methods.ByName("Fine"))
	require.NoError(t, d.keyErr)
	require.NoError(t, d.retentionErr)
	assert.Equal(t, protoreflect.Name("request_id"), d.keyField.Name())

	s, err := NewServer(&nopStore{}, WithLogger(nil))
	require.NoError(t, err)
	s.policies.Store("/bad.v1.Bad/IntKey", &methodPolicy{policy: Required, err: declare(methods.ByName("IntKey")).keyErr})
	ran := false
	_, err = s.unary(context.Background(), &testpb.TransferRequest{}, &grpc.UnaryServerInfo{FullMethod: "/bad.v1.Bad/IntKey"}, func(context.Context, any) (any, error) {
		ran = true
		return nil, nil
	})
	assert.Equal(t, codes.Internal, status.Code(err))
	assert.False(t, ran)
}

type nopStore struct{ Store }

// The two ways of leaving fields out (cutting them from the encoding, and
// clearing them in a copy) give the same bytes as marshalling the request
// with the fields cleared.
func TestFilterEncodingsAgree(t *testing.T) {
	in := (&testpb.TransferRequest{}).ProtoReflect().Descriptor()
	fields := in.Fields()
	top := []protowire.Number{fields.ByName("request_id").Number(), fields.ByName("trace_note").Number(), fields.ByName("count").Number()}
	cut := &requestFilter{top: top}
	copied := &requestFilter{nested: &pruneNode{clear: top}}
	r := rand.New(rand.NewPCG(1, 2))
	str := func() string {
		if r.IntN(3) == 0 {
			return ""
		}
		return string(rune('a'+r.IntN(26))) + "x"
	}
	for range 500 {
		req := &testpb.TransferRequest{RequestId: str(), Account: str(), AmountCents: r.Int64N(3), TraceNote: str(), Count: r.Int32N(3)}
		for range r.IntN(3) {
			req.Hops = append(req.Hops, &testpb.Sender{Name: str(), SentAt: str()})
		}
		if r.IntN(2) == 0 {
			req.Sender = &testpb.Sender{Name: str(), SentAt: str()}
		}
		want := proto.Clone(req).(*testpb.TransferRequest)
		want.RequestId, want.TraceNote, want.Count = "", "", 0
		wantBytes, err := deterministic.Marshal(want)
		require.NoError(t, err)
		a, err := cut.encode([]byte("prefix"), req)
		require.NoError(t, err)
		b, err := copied.encode(nil, req)
		require.NoError(t, err)
		require.Equal(t, "prefix"+string(wantBytes), string(a))
		require.Equal(t, string(wantBytes), string(b))
	}
}

// A method without annotations is fingerprinted as before, and a method
// whose only exclusions are top-level fields (the AIP-155 key field) costs
// no copy of the request.
func TestFingerprintCostsNothingExtra(t *testing.T) {
	p := resolve(testpb.PaymentService_Charge_FullMethodName, &goPolicy{})
	assert.Nil(t, p.filter)
	assert.Nil(t, p.keyField)

	legacy := resolve(testpb.PolicyService_Legacy_FullMethodName, &goPolicy{keyFields: []keyFieldRule{{field: "request_id"}}})
	require.NotNil(t, legacy.filter)
	assert.Nil(t, legacy.filter.nested, "a top-level field is cut from the encoding")

	req := &testpb.LegacyRequest{RequestId: "r", Account: "acct", AmountCents: 5, Annotations: &testpb.LegacyAnnotations{TraceId: "t"}}
	allocs := func(f *requestFilter) float64 {
		return testing.AllocsPerRun(100, func() {
			fp := newFingerprint(testpb.PolicyService_Legacy_FullMethodName, f)
			_ = fp.add(req)
			fp.release()
		})
	}
	assert.Equal(t, allocs(nil), allocs(legacy.filter))
}

func TestNewUUID4(t *testing.T) {
	re := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	seen := map[string]bool{}
	for range 100 {
		u := newUUID4()
		require.Regexp(t, re, u)
		require.NoError(t, ValidateKey(u))
		require.False(t, seen[u])
		seen[u] = true
	}
}

// Method names the registry does not know come from callers (a server with
// an UnknownServiceHandler sees any name): their policies are resolved per
// call, never cached, so callers cannot grow the caches.
func TestUnknownMethodsAreNotCached(t *testing.T) {
	s, err := NewServer(&nopStore{}, WithLogger(nil))
	require.NoError(t, err)
	for i := range 3 {
		name := fmt.Sprintf("/attacker.v%d.Service/Method", i)
		assert.Equal(t, Optional, s.policy(name).policy)
		_, cached := s.policies.Load(name)
		assert.False(t, cached)
		_, cached = declaredCache.Load(name)
		assert.False(t, cached)
	}
	known := testpb.PolicyService_Transfer_FullMethodName
	assert.Equal(t, Required, s.policy(known).policy)
	_, cached := s.policies.Load(known)
	assert.True(t, cached)
}
