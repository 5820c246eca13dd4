package idempotency

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"

	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// How a method takes part is decided once per method, from the first source
// that says anything:
//
//  1. the method's (idempotency.v1.method) participation;
//  2. its idempotency_level: NO_SIDE_EFFECTS and IDEMPOTENT take no part;
//  3. infrastructure services (grpc.health.*, grpc.reflection.*,
//     grpc.channelz.*) take no part unless WithMethods or WithRequiredKey
//     names the method;
//  4. WithPolicy, if set;
//  5. WithMethods and WithRequiredKey;
//  6. otherwise the method takes part with an optional key.
//
// The key field and the fingerprint exclusions are declared the same way:
// field options first, then WithKeyField and WithFingerprintExclude for what
// the proto does not declare. The server and the client interceptors resolve
// through the same code, so a client gives keys to exactly the methods that
// take part on a server built from the same protos.

// methodPolicy is how one method takes part, resolved once and cached.
type methodPolicy struct {
	policy Policy
	// retention overrides the server's WithRetention when positive.
	retention time.Duration
	// keyField is the request field that can carry the key of a unary or
	// server-streaming call; nil when only the metadata can.
	keyField protoreflect.FieldDescriptor
	// filter leaves fields out of the fingerprint; nil fingerprints the
	// whole request.
	filter *requestFilter
	// safe: the proto declares the method NO_SIDE_EFFECTS or IDEMPOTENT,
	// so a client may retry it without a key.
	safe bool
	// declared: the method is in the protobuf registry. Only such policies
	// are cached: method names the registry does not know come from the
	// caller (an UnknownServiceHandler sees any name), and caching them
	// would let callers grow the cache without bound.
	declared bool
	// err: the method takes part, but its key field or its fingerprint
	// exclusions cannot be honoured. Its calls fail with Internal rather
	// than run unguarded, on both sides.
	err error
	// retentionErr: the method takes part, but its declared retention
	// cannot be honoured. Only the server needs the retention, so only its
	// calls fail.
	retentionErr error
}

// serverErr is why a server cannot honour the method's policy, or nil.
func (p *methodPolicy) serverErr() error {
	if p.err != nil {
		return p.err
	}
	return p.retentionErr
}

// keyFieldName returns the name of the key field, for messages.
func (p *methodPolicy) keyFieldName() string {
	if p.keyField == nil {
		return ""
	}
	return string(p.keyField.Name())
}

// goPolicy is what the Go options say about methods; the proto's own
// declarations come first.
type goPolicy struct {
	fn        func(fullMethod string) Policy // WithPolicy
	methods   map[string]bool                // WithMethods; nil: every method
	required  map[string]bool                // WithRequiredKey; "*": every method
	keyFields []keyFieldRule                 // WithKeyField, WithClientKeyField
	exclude   map[string][]string            // WithFingerprintExclude: method -> paths
}

// keyFieldRule names the request field that carries the key, for some
// methods or (methods nil) for every method whose request has such a field.
type keyFieldRule struct {
	field   protoreflect.Name
	methods map[string]bool
}

// participation is the Go options' decision, for a method the proto says
// nothing about.
func (g *goPolicy) participation(fullMethod string) Policy {
	named := g.methods[fullMethod] || g.required[fullMethod]
	if infrastructure(fullMethod) && !named {
		return Skip
	}
	if g.fn != nil {
		return g.fn(fullMethod)
	}
	if g.methods != nil && !g.methods[fullMethod] {
		return Skip
	}
	if g.required[fullMethod] || g.required["*"] {
		return Required
	}
	return Optional
}

// infrastructure reports whether a method belongs to a service that gRPC
// itself provides: health checks, reflection, channelz. Their calls change
// nothing and come in numbers (a probe every few seconds), so they take no
// part unless a Go option names them.
func infrastructure(fullMethod string) bool {
	svc, _, _ := strings.Cut(strings.TrimPrefix(fullMethod, "/"), "/")
	for _, p := range []string{"grpc.health.", "grpc.reflection.", "grpc.channelz."} {
		if strings.HasPrefix(svc, p) {
			return true
		}
	}
	return false
}

// resolve works out the policy of fullMethod from its descriptors in the
// global registry and from g.
func resolve(fullMethod string, g *goPolicy) *methodPolicy {
	d := declaredPolicy(fullMethod)
	p := &methodPolicy{safe: d.safe, retention: d.retention, declared: d.md != nil}
	switch d.participation {
	case idempotencyv1.Participation_PARTICIPATION_KEY_REQUIRED:
		p.policy = Required
	case idempotencyv1.Participation_PARTICIPATION_KEY_OPTIONAL:
		p.policy = Optional
	case idempotencyv1.Participation_PARTICIPATION_NONE:
		p.policy = Skip
	default:
		if d.safe {
			p.policy = Skip
		} else {
			p.policy = g.participation(fullMethod)
		}
	}
	if p.policy == Skip || d.md == nil {
		// What such a method declares wrongly does not matter: it runs as
		// if there were no interceptor.
		return p
	}
	p.retentionErr = d.retentionErr
	if d.keyErr != nil {
		p.err = d.keyErr
		return p
	}
	in := d.md.Input()
	p.keyField = d.keyField
	if p.keyField == nil {
		for _, r := range g.keyFields {
			if r.methods != nil && !r.methods[fullMethod] {
				continue
			}
			if fd := in.Fields().ByName(r.field); fd != nil && keyFieldProblem(fd) == "" {
				p.keyField = fd
			}
		}
	}
	var paths [][]protoreflect.FieldDescriptor
	for _, path := range g.exclude[fullMethod] {
		fds, err := fieldPath(in, path)
		if err != nil {
			p.err = fmt.Errorf("WithFingerprintExclude(%q, %q): %w", fullMethod, path, err)
			return p
		}
		paths = append(paths, fds)
	}
	p.filter = newRequestFilter(d.marked, p.keyField, paths)
	return p
}

// declared is what a method's descriptors say.
type declared struct {
	md            protoreflect.MethodDescriptor // nil: not in the registry
	participation idempotencyv1.Participation
	safe          bool
	retention     time.Duration
	keyField      protoreflect.FieldDescriptor
	marked        *pruneNode // fields marked fingerprint_exclude
	retentionErr  error      // the declared retention cannot be honoured
	keyErr        error      // the declared key field cannot be honoured
}

var declaredCache sync.Map // full method name -> *declared

// declaredPolicy returns what the global registry's descriptors say about
// fullMethod. A method that is not in the registry declares nothing, and is
// not cached (see methodPolicy.declared).
func declaredPolicy(fullMethod string) *declared {
	if d, ok := declaredCache.Load(fullMethod); ok {
		return d.(*declared)
	}
	md, err := findMethod(protoregistry.GlobalFiles, fullMethod)
	if err != nil {
		return &declared{}
	}
	v, _ := declaredCache.LoadOrStore(fullMethod, declare(md))
	return v.(*declared)
}

// cachedPolicy returns the policy of fullMethod from cache, resolving and
// caching it on its first call.
func cachedPolicy(cache *sync.Map, fullMethod string, g *goPolicy) *methodPolicy {
	if p, ok := cache.Load(fullMethod); ok {
		return p.(*methodPolicy)
	}
	p := resolve(fullMethod, g)
	if !p.declared {
		return p
	}
	v, _ := cache.LoadOrStore(fullMethod, p)
	return v.(*methodPolicy)
}

// declare reads a method's idempotency options, idempotency_level and the
// field options of its request.
func declare(md protoreflect.MethodDescriptor) *declared {
	d := &declared{md: md}
	d.participation, d.safe, d.retention, d.retentionErr = methodOptions(md)
	in := md.Input()
	fields := in.Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if !fieldOptions(fd).GetKey() {
			continue
		}
		if problem := keyFieldProblem(fd); problem != "" {
			d.keyErr = fmt.Errorf("%s is marked (idempotency.v1.field).key, but %s", fd.FullName(), problem)
			d.keyField = nil
			return d
		}
		if d.keyField != nil {
			d.keyErr = fmt.Errorf("%s has two fields marked (idempotency.v1.field).key: %s and %s", in.FullName(), d.keyField.Name(), fd.Name())
			d.keyField = nil
			return d
		}
		d.keyField = fd
	}
	d.marked = markedFields(in)
	return d
}

// methodOptions reads a method's (idempotency.v1.method) and
// idempotency_level.
func methodOptions(md protoreflect.MethodDescriptor) (part idempotencyv1.Participation, safe bool, retention time.Duration, err error) {
	opts, ok := md.Options().(*descriptorpb.MethodOptions)
	if !ok || opts == nil {
		return part, false, 0, nil
	}
	switch opts.GetIdempotencyLevel() {
	case descriptorpb.MethodOptions_NO_SIDE_EFFECTS, descriptorpb.MethodOptions_IDEMPOTENT:
		safe = true
	}
	if !proto.HasExtension(opts, idempotencyv1.E_Method) {
		return part, safe, 0, nil
	}
	mp := proto.GetExtension(opts, idempotencyv1.E_Method).(*idempotencyv1.MethodPolicy)
	part = mp.GetParticipation()
	if r := mp.GetRetention(); r != nil {
		if err := r.CheckValid(); err != nil {
			return part, safe, 0, fmt.Errorf("(idempotency.v1.method).retention of %s: %w", md.FullName(), err)
		}
		retention = r.AsDuration()
		if retention < MinRetention || retention > MaxRetention {
			return part, safe, 0, fmt.Errorf("(idempotency.v1.method).retention of %s is %v; use %v to %v", md.FullName(), retention, MinRetention, MaxRetention)
		}
	}
	return part, safe, retention, nil
}

func fieldOptions(fd protoreflect.FieldDescriptor) *idempotencyv1.FieldPolicy {
	opts, ok := fd.Options().(*descriptorpb.FieldOptions)
	if !ok || opts == nil || !proto.HasExtension(opts, idempotencyv1.E_Field) {
		return nil
	}
	return proto.GetExtension(opts, idempotencyv1.E_Field).(*idempotencyv1.FieldPolicy)
}

// keyFieldProblem says why fd cannot carry a key, or "" if it can.
func keyFieldProblem(fd protoreflect.FieldDescriptor) string {
	switch {
	case fd.Kind() != protoreflect.StringKind:
		return fmt.Sprintf("it is a %v field; a key field is a string", fd.Kind())
	case fd.Cardinality() == protoreflect.Repeated:
		return "it is repeated; a key field holds one string"
	}
	return ""
}

// optionsFile is the file that declares this module's options, as users'
// protos import it.
const optionsFile = "idempotency/v1/options.proto"

// checkDeclared checks the idempotency options in every file of files that
// imports options.proto, so that an option the server cannot honour stops
// the server at startup rather than failing its first call.
func checkDeclared(files *protoregistry.Files) error {
	var errs []error
	files.RangeFiles(func(f protoreflect.FileDescriptor) bool {
		imports := f.Imports()
		uses := false
		for i := 0; i < imports.Len(); i++ {
			if imports.Get(i).Path() == optionsFile {
				uses = true
				break
			}
		}
		if !uses {
			return true
		}
		services := f.Services()
		for i := 0; i < services.Len(); i++ {
			methods := services.Get(i).Methods()
			for j := 0; j < methods.Len(); j++ {
				if _, _, _, err := methodOptions(methods.Get(j)); err != nil {
					errs = append(errs, err)
				}
			}
		}
		errs = append(errs, checkMessages(f.Messages())...)
		return true
	})
	for i, err := range errs {
		errs[i] = fmt.Errorf("idempotency: %w", err)
	}
	return errors.Join(errs...)
}

// checkMessages checks the key fields of messages and of the messages
// nested in them.
func checkMessages(msgs protoreflect.MessageDescriptors) []error {
	var errs []error
	for i := 0; i < msgs.Len(); i++ {
		m := msgs.Get(i)
		fields := m.Fields()
		keys := 0
		for j := 0; j < fields.Len(); j++ {
			fd := fields.Get(j)
			if !fieldOptions(fd).GetKey() {
				continue
			}
			keys++
			if problem := keyFieldProblem(fd); problem != "" {
				errs = append(errs, fmt.Errorf("%s is marked (idempotency.v1.field).key, but %s", fd.FullName(), problem))
			}
		}
		if keys > 1 {
			errs = append(errs, fmt.Errorf("%s has %d fields marked (idempotency.v1.field).key; mark one", m.FullName(), keys))
		}
		errs = append(errs, checkMessages(m.Messages())...)
	}
	return errs
}

// findMethod finds a method by its full gRPC name, "/package.Service/Method".
func findMethod(files *protoregistry.Files, fullMethod string) (protoreflect.MethodDescriptor, error) {
	svc, name, ok := strings.Cut(strings.TrimPrefix(fullMethod, "/"), "/")
	if !ok {
		return nil, fmt.Errorf("malformed method name %q", fullMethod)
	}
	d, err := files.FindDescriptorByName(protoreflect.FullName(svc))
	if err != nil {
		return nil, fmt.Errorf("service %s is not in the protobuf registry: %w", svc, err)
	}
	sd, ok := d.(protoreflect.ServiceDescriptor)
	if !ok {
		return nil, fmt.Errorf("%s is not a service", svc)
	}
	md := sd.Methods().ByName(protoreflect.Name(name))
	if md == nil {
		return nil, fmt.Errorf("service %s has no method %s", svc, name)
	}
	return md, nil
}

// checkMethodName reports whether m is a full gRPC method name as the
// generated code spells it, "/package.Service/Method", so that a name that
// could never match a call is refused where it is set.
func checkMethodName(m string) error {
	svc, name, ok := strings.Cut(strings.TrimPrefix(m, "/"), "/")
	if !strings.HasPrefix(m, "/") || !ok || !protoreflect.FullName(svc).IsValid() || !protoreflect.Name(name).IsValid() {
		return fmt.Errorf("%q is not a full method name: write \"/package.Service/Method\", as the generated _FullMethodName constants do", m)
	}
	return nil
}

// fieldPath resolves a FieldMask-style path, "sender.sent_at", in a
// request: every element but the last is a singular message field.
func fieldPath(md protoreflect.MessageDescriptor, path string) ([]protoreflect.FieldDescriptor, error) {
	var fds []protoreflect.FieldDescriptor
	elems := strings.Split(path, ".")
	for i, e := range elems {
		fd := md.Fields().ByName(protoreflect.Name(e))
		if fd == nil {
			return nil, fmt.Errorf("%s has no field %q", md.FullName(), e)
		}
		fds = append(fds, fd)
		if i == len(elems)-1 {
			break
		}
		if fd.Message() == nil || fd.IsList() || fd.IsMap() {
			return nil, fmt.Errorf("%s is not a singular message field, so the path cannot go through it", fd.FullName())
		}
		md = fd.Message()
	}
	return fds, nil
}

// A requestFilter leaves fields out of a request before it is
// fingerprinted. Leaving a field out and clearing it give the same
// fingerprint: the deterministic encoding of a message is the encodings of
// its set fields, in field number order.
type requestFilter struct {
	// top are the fields left out at the top level of the request. When
	// nested is nil they are cut from the encoding itself, so the request is
	// neither copied nor changed.
	top []protowire.Number
	// nested, if not nil, is everything to clear, nested fields included,
	// in a copy of the request.
	nested *pruneNode
}

// A pruneNode is what to clear in one message: fields, and fields of the
// messages it holds.
type pruneNode struct {
	clear   []protowire.Number
	descend []pruneEdge
}

type pruneEdge struct {
	field protowire.Number
	node  *pruneNode
}

// newRequestFilter combines the fields marked fingerprint_exclude (marked),
// the key field and the Go option's paths into one filter, or nil.
func newRequestFilter(marked *pruneNode, keyField protoreflect.FieldDescriptor, paths [][]protoreflect.FieldDescriptor) *requestFilter {
	// A node of its own for the top level: the marked graph's nodes are
	// shared by every place their message appears, and the key field and
	// the paths apply at the top only.
	root := &pruneNode{}
	if marked != nil {
		root.clear = slices.Clone(marked.clear)
		root.descend = slices.Clone(marked.descend)
	}
	if keyField != nil {
		root.clear = append(root.clear, keyField.Number())
	}
	byPrefix := map[string]*pruneNode{}
	for _, fds := range paths {
		n := root
		prefix := ""
		for i, fd := range fds {
			if i == len(fds)-1 {
				n.clear = append(n.clear, fd.Number())
				break
			}
			prefix += "." + string(fd.Name())
			next := byPrefix[prefix]
			if next == nil {
				next = &pruneNode{}
				byPrefix[prefix] = next
				n.descend = append(n.descend, pruneEdge{field: fd.Number(), node: next})
			}
			n = next
		}
	}
	if len(root.clear) == 0 && len(root.descend) == 0 {
		return nil
	}
	slices.Sort(root.clear)
	root.clear = slices.Compact(root.clear)
	if len(root.descend) == 0 {
		return &requestFilter{top: root.clear}
	}
	return &requestFilter{nested: root}
}

// encode appends the deterministic encoding of m, without the filtered
// fields, to buf.
func (f *requestFilter) encode(buf []byte, m proto.Message) ([]byte, error) {
	if f == nil {
		return deterministic.MarshalAppend(buf, m)
	}
	if f.nested != nil {
		m = proto.Clone(m)
		f.nested.apply(m.ProtoReflect())
		return deterministic.MarshalAppend(buf, m)
	}
	start := len(buf)
	b, err := deterministic.MarshalAppend(buf, m)
	if err != nil {
		return b, err
	}
	kept, err := dropFields(b[start:], f.top)
	if err != nil {
		return b, err
	}
	return b[:start+len(kept)], nil
}

// dropFields removes the top-level fields numbered drop from the encoded
// message b, in place.
func dropFields(b []byte, drop []protowire.Number) ([]byte, error) {
	r, w := 0, 0
	for r < len(b) {
		num, typ, n := protowire.ConsumeTag(b[r:])
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		m := protowire.ConsumeFieldValue(num, typ, b[r+n:])
		if m < 0 {
			return nil, protowire.ParseError(m)
		}
		end := r + n + m
		if !slices.Contains(drop, num) {
			w += copy(b[w:], b[r:end])
		}
		r = end
	}
	return b[:w], nil
}

// apply clears n's fields in m and in the messages m holds. Fields are found
// by number in m's own descriptor, so any implementation of the message
// type will do.
func (n *pruneNode) apply(m protoreflect.Message) {
	fields := m.Descriptor().Fields()
	for _, num := range n.clear {
		if fd := fields.ByNumber(num); fd != nil {
			m.Clear(fd)
		}
	}
	for _, e := range n.descend {
		fd := fields.ByNumber(e.field)
		if fd == nil || !m.Has(fd) {
			continue
		}
		v := m.Mutable(fd)
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				e.node.apply(l.Get(i).Message())
			}
		case fd.IsMap():
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				e.node.apply(mv.Message())
				return true
			})
		default:
			e.node.apply(v.Message())
		}
	}
}

// heldMessage is the message type a field holds (the value type of a map),
// or nil.
func heldMessage(fd protoreflect.FieldDescriptor) protoreflect.MessageDescriptor {
	if fd.IsMap() {
		return fd.MapValue().Message()
	}
	return fd.Message()
}

// markedFields returns what to clear in a root message so that every field
// marked fingerprint_exclude is left out, wherever in the root its message
// appears; nil if no field is marked. The nodes form a graph like the
// message types do, cycles included; clearing follows the data, which is
// finite.
func markedFields(root protoreflect.MessageDescriptor) *pruneNode {
	var order []protoreflect.MessageDescriptor
	seen := map[protoreflect.FullName]bool{}
	var visit func(md protoreflect.MessageDescriptor)
	visit = func(md protoreflect.MessageDescriptor) {
		if seen[md.FullName()] {
			return
		}
		seen[md.FullName()] = true
		order = append(order, md)
		fields := md.Fields()
		for i := 0; i < fields.Len(); i++ {
			if sub := heldMessage(fields.Get(i)); sub != nil {
				visit(sub)
			}
		}
	}
	visit(root)

	excluded := func(fd protoreflect.FieldDescriptor) bool { return fieldOptions(fd).GetFingerprintExclude() }
	// needs: the message holds a marked field, itself or further down.
	needs := map[protoreflect.FullName]bool{}
	for _, md := range order {
		fields := md.Fields()
		for i := 0; i < fields.Len(); i++ {
			if excluded(fields.Get(i)) {
				needs[md.FullName()] = true
			}
		}
	}
	for changed := true; changed; {
		changed = false
		for _, md := range order {
			if needs[md.FullName()] {
				continue
			}
			fields := md.Fields()
			for i := 0; i < fields.Len(); i++ {
				if sub := heldMessage(fields.Get(i)); sub != nil && needs[sub.FullName()] {
					needs[md.FullName()] = true
					changed = true
					break
				}
			}
		}
	}
	if !needs[root.FullName()] {
		return nil
	}
	nodes := map[protoreflect.FullName]*pruneNode{}
	for _, md := range order {
		if needs[md.FullName()] {
			nodes[md.FullName()] = &pruneNode{}
		}
	}
	for _, md := range order {
		n := nodes[md.FullName()]
		if n == nil {
			continue
		}
		fields := md.Fields()
		for i := 0; i < fields.Len(); i++ {
			fd := fields.Get(i)
			if excluded(fd) {
				n.clear = append(n.clear, fd.Number())
			} else if sub := heldMessage(fd); sub != nil && needs[sub.FullName()] {
				n.descend = append(n.descend, pruneEdge{field: fd.Number(), node: nodes[sub.FullName()]})
			}
		}
	}
	return nodes[root.FullName()]
}

// requestKey returns the key a request's key field carries, "" if none.
func (p *methodPolicy) requestKey(req proto.Message) string {
	if p.keyField == nil || req == nil {
		return ""
	}
	m := req.ProtoReflect()
	fd := m.Descriptor().Fields().ByNumber(p.keyField.Number())
	if fd == nil || fd.Kind() != protoreflect.StringKind || fd.IsList() {
		return ""
	}
	return m.Get(fd).String()
}

// setRequestKey sets the request's key field to key.
func (p *methodPolicy) setRequestKey(req proto.Message, key string) bool {
	m := req.ProtoReflect()
	fd := m.Descriptor().Fields().ByNumber(p.keyField.Number())
	if fd == nil || fd.Kind() != protoreflect.StringKind || fd.IsList() {
		return false
	}
	m.Set(fd, protoreflect.ValueOfString(key))
	return true
}
