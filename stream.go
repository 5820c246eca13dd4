package idempotency

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// StreamServerInterceptor returns the interceptor for streaming calls, with
// the same rules as the unary one:
//
//   - server streaming: the request is read first and fingerprinted (and,
//     if the request has a key field, the key comes from it when the
//     metadata has none); every sent message is recorded in order, and a
//     duplicate gets the same messages, then the same status.
//   - client streaming: the key comes from the metadata only, since the
//     requests are not read before the key is reserved; the fingerprint
//     covers every request message, in order; a duplicate's messages are read and fingerprinted first, then
//     the stored outcome is returned, or FailedPrecondition if they differ.
//   - bidirectional: as client streaming, but a duplicate gets the stored
//     messages while its own are read, so a client that waits for each
//     answer before it sends the next one completes.
//
// Recording is bounded by WithMaxStreamMessages and WithMaxRecordSize; a
// stream that outgrows them is not stored and its key is released.
//
// A handler that returns after its client has gone (its deadline passed, it
// cancelled, its connection closed) is recorded as a unary one is: what it
// sends and sets from then on is recorded, not failed, and its outcome is
// stored if its code is cacheable, so that the client's retry replays it.
// A stream whose requests were cut short (a receive failed before the
// handler read their end), or whose send failed while its client was still
// there, stores nothing and releases its key.
func (s *Server) StreamServerInterceptor() grpc.StreamServerInterceptor {
	s.streams.Store(true)
	return s.stream
}

func (s *Server) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx := ss.Context()
	p := s.policy(info.FullMethod)
	switch {
	case p.serverErr() != nil:
		return s.policyError(info.FullMethod, p)
	case p.policy == Skip:
		return handler(srv, ss)
	}
	var (
		types    methodTypes
		typesErr error
		first    proto.Message // a server stream's request, read before the handler ran
	)
	readFirst := func() error {
		if types, typesErr = typesOf(info.FullMethod); typesErr != nil {
			return status.Errorf(codes.Internal, "idempotency: cannot record %s: %v", info.FullMethod, typesErr)
		}
		req := types.in.New().Interface()
		if err := ss.RecvMsg(req); err != nil {
			return err
		}
		first = req
		return nil
	}
	if !info.IsClientStream && p.keyField != nil {
		// The key may be in the request.
		if err := readFirst(); err != nil {
			return err
		}
	}
	c, err := s.prepare(ctx, info.FullMethod, p, first)
	if c == nil {
		if err != nil {
			return err
		}
		if first != nil {
			return handler(srv, &recordingStream{ServerStream: ss, first: first}) // hands over the request read
		}
		return handler(srv, ss)
	}
	rs := &recordingStream{ServerStream: ss, c: c}
	var sum []byte
	if !info.IsClientStream {
		// One request: read it now, so that its fingerprint is known
		// before the key is reserved, as for unary calls.
		if first == nil {
			if err := readFirst(); err != nil {
				return err
			}
		}
		fp := newFingerprint(info.FullMethod, c.filter)
		err := fp.add(first)
		sum = fp.sumInto(c.sum[:0])
		fp.release()
		if err != nil {
			return err
		}
		rs.first = first
	} else {
		if types, typesErr = typesOf(info.FullMethod); typesErr != nil {
			return status.Errorf(codes.Internal, "idempotency: cannot record %s: %v", info.FullMethod, typesErr)
		}
		rs.fp = newFingerprint(info.FullMethod, c.filter)
	}

	r, err := c.reserve(ctx, sum)
	switch {
	case err != nil:
		return err
	case r.rec != nil:
		return c.replayStream(ss, r, types, info)
	case r.first == nil:
		return handler(srv, rs) // fail-open; rs hands over the request read
	}

	f := r.first
	ts := &f.ts
	ts.ServerTransportStream, ts.client = grpc.ServerTransportStreamFromContext(ctx), ctx
	rs.ctx = f.handlerContext(ctx)
	defer f.hctx.end(nil)
	if ts.ServerTransportStream != nil {
		rs.ctx = grpc.NewContextWithServerTransportStream(rs.ctx, ts)
	}
	rs.ts = ts
	rs.recording = true
	var herr error
	ran := c.run(rs.ctx, f, func() { herr = handler(srv, rs) })

	rec := &f.rec
	code := setStatus(rec, herr)
	rec.Fingerprint, rec.Responses = sum, rs.responses
	if rs.fp != nil {
		rec.Fingerprint = rs.fp.sum()
		rec.RequestsRead = rs.fp.n
		rec.RequestsClosed = rs.closed
	}
	rec.Header, rec.Trailer = ts.recorded()
	cacheable := s.o.isCacheable(code)
	// A client that went away before the handler returned is no reason to
	// drop the outcome: the handler ran to its end, and its sends from then
	// on were recorded, so its record is whole and the client's retry
	// replays it, as for a unary call.
	if rs.broken != nil {
		// Half an outcome is worse than none: a retry must run again.
		c.s.o.logger.Info("idempotency: stream's requests were cut short or a send failed; outcome not stored, key released", "method", c.method, "key", c.key, "err", rs.broken)
		cacheable = false
	}
	if err := c.finish(rs.ctx, f, cacheable, rs.overflow, ran); err != nil {
		return err
	}
	return herr
}

// recordingStream is the stream a first execution's handler sees: it
// fingerprints what the handler receives and records what it sends.
type recordingStream struct {
	grpc.ServerStream
	ctx       context.Context
	c         *call
	ts        *transportRecorder
	recording bool

	first proto.Message // a server stream's request, read before the handler ran
	fp    *fingerprint  // client and bidi streams: over every request read
	// closed is set when the handler read the end of the requests.
	closed bool

	mu        sync.Mutex // SendMsg and RecvMsg may run on two goroutines
	responses [][]byte
	size      int
	overflow  error
	// broken is why the outcome cannot be stored: the requests were cut
	// short, or a send failed while the client was still there.
	broken error
}

func (r *recordingStream) Context() context.Context {
	if r.ctx != nil {
		return r.ctx
	}
	return r.ServerStream.Context()
}

func (r *recordingStream) RecvMsg(m any) error {
	if r.first != nil {
		pm, ok := m.(proto.Message)
		if !ok {
			return status.Errorf(codes.Internal, "idempotency: request type %T is not a protobuf message", m)
		}
		proto.Reset(pm)
		proto.Merge(pm, r.first)
		r.first = nil
		return nil
	}
	err := r.ServerStream.RecvMsg(m)
	if !r.recording || r.fp == nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case r.closed:
		// Every request was read; what a later receive says changes
		// nothing.
	case err == nil:
		if ferr := r.fp.add(m); ferr != nil {
			r.broken = ferr
		}
	case errors.Is(err, io.EOF):
		r.closed = true
	default:
		r.broken = fmt.Errorf("the requests were cut short: %w", err)
	}
	return err
}

// unlessGone runs send, which passes part of the handler's outcome on to
// the client, unless the client has gone (its deadline passed, it
// cancelled, its connection closed). Its error is send's, but only while
// the client is there: once it has gone, what the handler sends is recorded,
// not failed, so that a handler that runs to its end after its client left
// (a charge that was under way) leaves its whole outcome for the client's
// retry to replay, as a unary handler does.
func unlessGone(client context.Context, send func() error) error {
	if client.Err() != nil {
		return nil
	}
	if err := send(); err != nil && client.Err() == nil {
		return err
	}
	return nil
}

func (r *recordingStream) SendMsg(m any) error {
	if !r.recording {
		return r.ServerStream.SendMsg(m)
	}
	r.mu.Lock()
	record := r.overflow == nil
	r.mu.Unlock()
	// The message is encoded before it is sent: one that cannot be
	// encoded makes grpc-go's send fail and end the stream, which then
	// looks like a client that went away; that failure is the handler's.
	var b []byte
	var encErr error
	if record {
		if pm, ok := m.(proto.Message); ok {
			b, encErr = proto.Marshal(pm)
		} else {
			encErr = fmt.Errorf("response type %T is not a protobuf message", m)
		}
	}
	client := r.ServerStream.Context()
	send := func() error { return r.ServerStream.SendMsg(m) }
	var err error
	if encErr != nil && client.Err() == nil {
		err = send()
	} else {
		err = unlessGone(client, send)
	}
	if err != nil {
		r.mu.Lock()
		r.broken = fmt.Errorf("a send failed: %w", err)
		r.mu.Unlock()
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !record || r.overflow != nil {
		return nil
	}
	if encErr != nil {
		r.overflow = encErr // a codec of the server's own sent it
		return nil
	}
	o := r.c.s.o
	switch {
	case len(r.responses) >= o.maxStreamMsgs:
		r.overflow = fmt.Errorf("stream sent more than %d messages (WithMaxStreamMessages)", o.maxStreamMsgs)
	case r.size+len(b) > o.maxRecordSize:
		r.overflow = fmt.Errorf("stream sent more than %d bytes (WithMaxRecordSize)", o.maxRecordSize)
	default:
		r.responses = append(r.responses, b)
		r.size += len(b)
		return nil
	}
	r.responses, r.size = nil, 0 // what outgrew the bound is not kept
	return nil
}

func (r *recordingStream) SetHeader(md metadata.MD) error {
	if r.ts == nil {
		return r.ServerStream.SetHeader(md)
	}
	md = withoutReplayed(md)
	if err := unlessGone(r.ServerStream.Context(), func() error { return r.ServerStream.SetHeader(md) }); err != nil {
		return err
	}
	r.ts.addHeader(md)
	return nil
}

func (r *recordingStream) SendHeader(md metadata.MD) error {
	if r.ts == nil {
		return r.ServerStream.SendHeader(md)
	}
	md = withoutReplayed(md)
	if err := unlessGone(r.ServerStream.Context(), func() error { return r.ServerStream.SendHeader(md) }); err != nil {
		return err
	}
	r.ts.addHeader(md)
	return nil
}

func (r *recordingStream) SetTrailer(md metadata.MD) {
	r.ServerStream.SetTrailer(md)
	if r.ts != nil {
		r.ts.addTrailer(md)
	}
}

func (r *transportRecorder) addTrailer(md metadata.MD) {
	r.mu.Lock()
	r.trailer = metadata.Join(r.trailer, md)
	r.mu.Unlock()
}

// replayStream answers a duplicate stream from rec. For client and bidi
// streams it reads the duplicate's requests (while sending the stored
// responses, for bidi) and refuses it if they differ from the first's. A
// client stream's requests are all read before anything of rec is sent, so
// that a refused one gets no replay header and none of rec's header.
func (c *call) replayStream(ss grpc.ServerStream, r reservation, types methodTypes, info *grpc.StreamServerInfo) error {
	rec := r.rec
	if info.IsClientStream && !info.IsServerStream {
		if err := c.readDuplicate(ss, rec, types); err != nil {
			return err
		}
	}
	if err := ss.SetHeader(replayHeader(rec)); err != nil {
		return err
	}
	var readErr chan error
	if info.IsClientStream && info.IsServerStream {
		// The client may wait for answers before it sends more.
		readErr = make(chan error, 1)
		go func() { readErr <- c.readDuplicate(ss, rec, types) }()
	}
	for _, b := range rec.Responses {
		m := types.out.New().Interface()
		if err := proto.Unmarshal(b, m); err != nil {
			return status.Errorf(codes.Internal, "idempotency: a response stored for this %s could not be read: %v", KeyHeader, err)
		}
		if err := ss.SendMsg(m); err != nil {
			return err
		}
	}
	if readErr != nil {
		if err := <-readErr; err != nil {
			return err
		}
	}
	if info.IsClientStream {
		c.replayed(ss.Context(), r)
	}
	if rec.Omitted != "" {
		return omittedError(rec)
	}
	if len(rec.Trailer) > 0 {
		ss.SetTrailer(mdFromRecord(rec.Trailer, 0))
	}
	if rec.GetStatus().GetCode() != int32(codes.OK) {
		return status.ErrorProto(rec.Status)
	}
	return nil
}

// readDuplicate reads as many requests as the first execution read (and the
// end of the stream, if it read it) and compares their fingerprint.
func (c *call) readDuplicate(ss grpc.ServerStream, rec *Record, types methodTypes) error {
	fp := newFingerprint(c.method, c.filter)
	extra := false
	for fp.n < rec.RequestsRead {
		m := types.in.New().Interface()
		err := ss.RecvMsg(m)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if err := fp.add(m); err != nil {
			return err
		}
	}
	if rec.RequestsClosed && fp.n == rec.RequestsRead {
		m := types.in.New().Interface()
		switch err := ss.RecvMsg(m); {
		case errors.Is(err, io.EOF):
		case err != nil:
			return err
		default:
			extra = true
		}
	}
	if extra || !bytes.Equal(fp.sum(), rec.Fingerprint) {
		return c.mismatch(ss.Context(), "")
	}
	return nil
}
