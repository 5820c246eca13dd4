package idempotency

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	// KeyHeader is the request metadata key that carries the idempotency key.
	KeyHeader = "idempotency-key"
	// ReplayedHeader is the response header that marks a replayed answer. Its
	// value is "true"; the first execution never carries it, so a value a
	// handler sets under this name is dropped from its header.
	ReplayedHeader = "idempotency-replayed"
	// MaxKeyLength is the longest idempotency key accepted, in bytes.
	MaxKeyLength = 255
)

// NewKey returns a fresh random idempotency key: 128 bits from crypto/rand,
// in 22 characters of unpadded URL-safe base64.
func NewKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// ValidateKey reports whether key is an acceptable idempotency key: 1 to 255
// characters of visible ASCII (0x21 to 0x7E). The error is an InvalidArgument
// status whose message names the header.
func ValidateKey(key string) error {
	return validateKey(key, KeyHeader+" metadata")
}

// validateKey is ValidateKey for a key found in where: the metadata, or a
// request's key field.
func validateKey(key, where string) error {
	if len(key) == 0 {
		return status.Errorf(codes.InvalidArgument, "%s is empty; send 1 to %d visible ASCII characters", where, MaxKeyLength)
	}
	if len(key) > MaxKeyLength {
		return status.Errorf(codes.InvalidArgument, "%s is %d bytes long; the limit is %d", where, len(key), MaxKeyLength)
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c < 0x21 || c > 0x7e {
			return status.Errorf(codes.InvalidArgument, "%s has byte 0x%02x at offset %d; only visible ASCII (0x21 to 0x7E) is allowed", where, c, i)
		}
	}
	return nil
}

// newUUID4 returns a random (version 4) UUID in its canonical form, as
// AIP-4235 client libraries fill request_id fields.
func newUUID4() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40 // version 4
	b[8] = b[8]&0x3f | 0x80 // RFC 9562 variant
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:], b[10:])
	return string(s[:])
}

// KeyFromIncoming returns the idempotency key of an incoming call. ok is false
// when the call has no key. A key that is present but not valid (more than one
// value, or not 1 to 255 visible ASCII characters) is an InvalidArgument error,
// and so is binary idempotency-key-bin metadata without idempotency-key: a
// key sent so must not be ignored, which would run every retry again.
func KeyFromIncoming(ctx context.Context) (key string, ok bool, err error) {
	vals := metadata.ValueFromIncomingContext(ctx, KeyHeader)
	switch len(vals) {
	case 0:
		if len(metadata.ValueFromIncomingContext(ctx, binKeyHeader)) > 0 {
			return "", true, binKeyError()
		}
		return "", false, nil
	case 1:
		if err := ValidateKey(vals[0]); err != nil {
			return "", true, err
		}
		return vals[0], true, nil
	default:
		return "", true, status.Errorf(codes.InvalidArgument, "%s metadata has %d values; send exactly one", KeyHeader, len(vals))
	}
}

// IsReplayed reports whether response header metadata marks a replay.
func IsReplayed(header metadata.MD) bool {
	v := header.Get(ReplayedHeader)
	return len(v) > 0 && v[0] == "true"
}

// keyFromOutgoing returns the idempotency key already set on an outgoing
// call, and an InvalidArgument error for one the server would refuse.
func keyFromOutgoing(ctx context.Context) (string, bool, error) {
	md, ok := metadata.FromOutgoingContext(ctx)
	if !ok {
		return "", false, nil
	}
	v := md.Get(KeyHeader)
	switch len(v) {
	case 0:
		if len(md.Get(binKeyHeader)) > 0 {
			return "", true, binKeyError()
		}
		return "", false, nil
	case 1:
		if err := ValidateKey(v[0]); err != nil {
			return "", true, err
		}
		return v[0], true, nil
	default:
		return "", true, status.Errorf(codes.InvalidArgument, "%s metadata has %d values; send exactly one", KeyHeader, len(v))
	}
}

// withoutReplayed returns md without ReplayedHeader (in any case), which a
// first execution's handler may not send: it would make the answer look
// like a replay. md itself is returned, not copied, when it has none.
func withoutReplayed(md metadata.MD) metadata.MD {
	for k := range md {
		if strings.EqualFold(k, ReplayedHeader) {
			out := make(metadata.MD, len(md))
			for k, v := range md {
				if !strings.EqualFold(k, ReplayedHeader) {
					out[k] = v
				}
			}
			return out
		}
	}
	return md
}

// binKeyHeader is the binary metadata name a client could mistake for the
// key's: refused, not ignored.
const binKeyHeader = KeyHeader + "-bin"

func binKeyError() error {
	return status.Errorf(codes.InvalidArgument, "%s metadata is not an idempotency key: send the key as %s metadata, 1 to %d visible ASCII characters (encode a binary key, in base64url say)",
		binKeyHeader, KeyHeader, MaxKeyLength)
}
