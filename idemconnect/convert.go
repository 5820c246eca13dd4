package idemconnect

import (
	"errors"
	"net/http"
	"strings"

	"connectrpc.com/connect"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

// The engine speaks gRPC's vocabulary (status, metadata), which is also
// connect's: the codes are the same numbers, and metadata are HTTP headers
// whose names are compared in lower case. Values of "-bin" headers are
// base64 on the wire in both protocols; the engine and its records hold them
// decoded, as grpc-go does, so that a record made by either adapter replays
// byte for byte through the other.

// mdFromHeader returns h as metadata: lower-case names, "-bin" values
// decoded.
func mdFromHeader(h http.Header) metadata.MD {
	md := make(metadata.MD, len(h))
	for k, vs := range h {
		k = strings.ToLower(k)
		out := make([]string, len(vs))
		for i, v := range vs {
			out[i] = v
			if strings.HasSuffix(k, "-bin") {
				if b, err := connect.DecodeBinaryHeader(v); err == nil {
					out[i] = string(b)
				}
			}
		}
		md[k] = append(md[k], out...)
	}
	return md
}

// addHeader adds md to h, encoding "-bin" values.
func addHeader(h http.Header, md metadata.MD) {
	for k, vs := range md {
		bin := strings.HasSuffix(k, "-bin")
		for _, v := range vs {
			if bin {
				v = connect.EncodeBinaryHeader([]byte(v))
			}
			h.Add(k, v)
		}
	}
}

// addedHeaders returns the values after holds beyond those before held.
func addedHeaders(before, after http.Header) http.Header {
	var out http.Header
	for k, vs := range after {
		n := len(before[k])
		if len(vs) <= n {
			continue
		}
		if out == nil {
			out = make(http.Header)
		}
		out[k] = vs[n:]
	}
	return out
}

// merge returns a with b's values added; a may be nil.
func merge(a, b http.Header) http.Header {
	if len(b) == 0 {
		return a
	}
	if a == nil {
		a = make(http.Header, len(b))
	}
	for k, vs := range b {
		a[k] = append(a[k], vs...)
	}
	return a
}

// statusError returns err, a handler's or a connect client's error, as the
// gRPC status the engine records: code, message and details.
func statusError(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return status.Error(codes.Code(connect.CodeOf(err)), err.Error())
	}
	st := &spb.Status{Code: int32(ce.Code()), Message: ce.Message()}
	for _, d := range ce.Details() {
		st.Details = append(st.Details, &anypb.Any{TypeUrl: "type.googleapis.com/" + d.Type(), Value: d.Bytes()})
	}
	return status.ErrorProto(st)
}

// FromStatus returns a gRPC status error (status.Error, status.Errorf) as the
// connect error with the same code, message and details, for serving a gRPC
// service implementation as a connect handler. Nil and errors that carry no
// gRPC status (connect errors among them) come back unchanged.
func FromStatus(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	if _, ok := status.FromError(err); !ok {
		return err
	}
	return connectError(err, nil)
}

// connectError returns the engine's status error err as a connect error,
// with trailer as its metadata.
func connectError(err error, trailer metadata.MD) error {
	st := status.Convert(err)
	ce := connect.NewError(connect.Code(st.Code()), errors.New(st.Message()))
	for _, d := range st.Proto().GetDetails() {
		if detail, derr := connect.NewErrorDetail(d); derr == nil {
			ce.AddDetail(detail)
		}
	}
	addHeader(ce.Meta(), trailer)
	return ce
}
