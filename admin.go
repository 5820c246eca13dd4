package idempotency

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	idempotencyv1 "github.com/grpcidem/idempotency/proto/idempotency/v1"
)

// Page sizes of the admin service's ListRecords.
const (
	DefaultAdminPageSize = 100
	MaxAdminPageSize     = 1000
)

// NewAdminServer returns the admin service (idempotency.v1.Admin) on store,
// which must implement Inspector. Register it on a gRPC server of its own,
// on a listener only operators reach, behind an interceptor that
// authenticates them: it reads every stored outcome, and ForgetRecord makes a
// call run again. docs/admin.md shows how.
//
// Keys are named as the interceptors name them: (scope, key), the scope being
// what WithScope returned for the call. The service does not run through the
// idempotency interceptors' engine, so it works beside any Server on the same
// store.
func NewAdminServer(store Store) (idempotencyv1.AdminServer, error) {
	if store == nil {
		return nil, errors.New("idempotency: NewAdminServer needs a Store, got nil")
	}
	in, ok := store.(Inspector)
	if !ok {
		return nil, fmt.Errorf("idempotency: the admin service needs a Store that implements idempotency.Inspector; %T does not", store)
	}
	return &adminServer{store: in}, nil
}

type adminServer struct {
	idempotencyv1.UnimplementedAdminServer
	store Inspector
}

// adminKey checks a request's (scope, key) and returns its store key.
func adminKey(scope, key []byte) (string, error) {
	if err := checkAdminScope(scope); err != nil {
		return "", err
	}
	switch {
	case len(key) == 0:
		return "", status.Error(codes.InvalidArgument, "key is required: the idempotency key as the client sent it")
	case len(key) > MaxKeyLength:
		return "", status.Errorf(codes.InvalidArgument, "key is %d bytes long; idempotency keys are at most %d", len(key), MaxKeyLength)
	}
	return StoreKey(string(scope), string(key)), nil
}

func checkAdminScope(scope []byte) error {
	if len(scope) > MaxScopeLength {
		return status.Errorf(codes.InvalidArgument, "scope is %d bytes long; scopes are at most %d", len(scope), MaxScopeLength)
	}
	return nil
}

// adminError converts a store's error into a status.
func adminError(ctx context.Context, op string, err error) error {
	switch {
	case ctx.Err() != nil:
		return status.FromContextError(ctx.Err()).Err()
	case errors.Is(err, ErrClosed):
		return status.Errorf(codes.Unavailable, "%s: the store is closed", op)
	case errors.Is(err, ErrBadPageToken):
		return status.Errorf(codes.InvalidArgument, "%s: %v; start the listing again without page_token", op, err)
	case errors.Is(err, ErrKeyTooLong):
		return status.Errorf(codes.InvalidArgument, "%s: %v", op, err)
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.Errorf(codes.Unavailable, "%s: the store failed: %v", op, err)
}

// A page token of the service is the store's page token, bound to the
// listing's store-key prefix so that a token of one listing cannot be
// passed to another: "1" then base64url(8 bytes of SHA-256 over the
// prefix, then the store's token).
const adminTokenVersion = "1"

func listingTag(prefix string) []byte {
	sum := sha256.Sum256([]byte("idempotency.v1.Admin/ListRecords\x00" + prefix))
	return sum[:8]
}

func encodePageToken(prefix, storeToken string) string {
	if storeToken == "" {
		return ""
	}
	b := append(listingTag(prefix), storeToken...)
	return adminTokenVersion + base64.RawURLEncoding.EncodeToString(b)
}

func decodePageToken(prefix, token string) (string, error) {
	const bad = "page_token is not a next_page_token of this listing"
	if len(token) < len(adminTokenVersion) || token[:len(adminTokenVersion)] != adminTokenVersion {
		return "", status.Error(codes.InvalidArgument, bad+": pass the next_page_token of the previous page unchanged, or none to start over")
	}
	b, err := base64.RawURLEncoding.DecodeString(token[len(adminTokenVersion):])
	if err != nil || len(b) <= 8 {
		return "", status.Error(codes.InvalidArgument, bad+": pass the next_page_token of the previous page unchanged, or none to start over")
	}
	if !bytes.Equal(b[:8], listingTag(prefix)) {
		return "", status.Error(codes.InvalidArgument, bad+": it belongs to another scope, key_prefix or all_scopes; pass the same ones as for the first page, or no page_token to start over")
	}
	return string(b[8:]), nil
}

func (a *adminServer) ListRecords(ctx context.Context, req *idempotencyv1.ListRecordsRequest) (*idempotencyv1.ListRecordsResponse, error) {
	size := int(req.GetPageSize())
	switch {
	case size == 0:
		size = DefaultAdminPageSize
	case size < 0 || size > MaxAdminPageSize:
		return nil, status.Errorf(codes.InvalidArgument, "page_size %d is out of range: 1 to %d, or 0 for %d", size, MaxAdminPageSize, DefaultAdminPageSize)
	}
	var prefix string
	if req.GetAllScopes() {
		if len(req.GetScope()) > 0 || len(req.GetKeyPrefix()) > 0 {
			return nil, status.Error(codes.InvalidArgument, "all_scopes lists every key of every scope: leave scope and key_prefix empty with it, or unset it to list one scope")
		}
	} else {
		if err := checkAdminScope(req.GetScope()); err != nil {
			return nil, err
		}
		if n := len(req.GetKeyPrefix()); n > MaxKeyLength {
			return nil, status.Errorf(codes.InvalidArgument, "key_prefix is %d bytes long; idempotency keys are at most %d", n, MaxKeyLength)
		}
		prefix = StoreKey(string(req.GetScope()), string(req.GetKeyPrefix()))
	}
	var storeToken string
	if req.GetPageToken() != "" {
		var err error
		if storeToken, err = decodePageToken(prefix, req.GetPageToken()); err != nil {
			return nil, err
		}
	}
	keys, next, err := a.store.ListKeys(ctx, prefix, storeToken, size)
	if err != nil {
		return nil, adminError(ctx, "list", err)
	}
	resp := &idempotencyv1.ListRecordsResponse{
		Records:       make([]*idempotencyv1.RecordSummary, 0, len(keys)),
		NextPageToken: encodePageToken(prefix, next),
	}
	for _, k := range keys {
		resp.Records = append(resp.Records, summarize(k))
	}
	return resp, nil
}

func summarize(k ListedKey) *idempotencyv1.RecordSummary {
	s := &idempotencyv1.RecordSummary{StoreKey: []byte(k.Key)}
	if scope, key, ok := SplitStoreKey(k.Key); ok {
		s.Scope, s.Key = []byte(scope), []byte(key)
	}
	e := k.Entry
	switch e.State {
	case Pending, Acquired:
		s.State = idempotencyv1.RecordState_RECORD_STATE_PENDING
		s.OwnerToken = e.Token
		s.ExpiresAt = timestamp(e.LeaseExpires)
	case Completed:
		s.State = idempotencyv1.RecordState_RECORD_STATE_COMPLETED
		s.ExpiresAt = timestamp(e.Expires)
		s.RecordSize = int64(len(e.Record))
		rec := new(Record)
		if err := proto.Unmarshal(e.Record, rec); err != nil {
			s.Code = int32(codes.DataLoss)
			s.Method = "(the stored record does not decode: " + err.Error() + ")"
			break
		}
		s.Method = rec.GetMethod()
		s.Code = rec.GetStatus().GetCode()
		s.ResponseCount = int64(len(rec.GetResponses()))
		s.CreatedAt = rec.GetCreatedAt()
	}
	return s
}

func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func (a *adminServer) GetRecord(ctx context.Context, req *idempotencyv1.GetRecordRequest) (*idempotencyv1.GetRecordResponse, error) {
	storeKey, err := adminKey(req.GetScope(), req.GetKey())
	if err != nil {
		return nil, err
	}
	e, err := a.store.Lookup(ctx, storeKey)
	if err != nil {
		return nil, adminError(ctx, "get", err)
	}
	resp := &idempotencyv1.GetRecordResponse{Scope: req.GetScope(), Key: req.GetKey(), StoreKey: []byte(storeKey)}
	switch e.State {
	case Pending, Acquired:
		resp.State = idempotencyv1.RecordState_RECORD_STATE_PENDING
		resp.OwnerToken = e.Token
		resp.LeaseExpiresAt = timestamp(e.LeaseExpires)
		resp.Fingerprint = e.Fingerprint
	case Completed:
		rec := new(Record)
		if err := proto.Unmarshal(e.Record, rec); err != nil {
			return nil, status.Errorf(codes.DataLoss, "the record stored for key %q in scope %q does not decode (%v); forget it to make the next call run again", req.GetKey(), req.GetScope(), err)
		}
		resp.State = idempotencyv1.RecordState_RECORD_STATE_COMPLETED
		resp.Record = rec
		resp.Status = rec.GetStatus()
		resp.ExpiresAt = timestamp(e.Expires)
		resp.RecordSize = int64(len(e.Record))
		resp.ResponseCount = int64(len(rec.GetResponses()))
		for _, r := range rec.GetResponses() {
			resp.ResponseBytes += int64(len(r))
		}
	default:
		return nil, status.Errorf(codes.NotFound, "key %q holds nothing in scope %q: never used, forgotten, released or expired", req.GetKey(), req.GetScope())
	}
	return resp, nil
}

func (a *adminServer) ForgetRecord(ctx context.Context, req *idempotencyv1.ForgetRecordRequest) (*idempotencyv1.ForgetRecordResponse, error) {
	storeKey, err := adminKey(req.GetScope(), req.GetKey())
	if err != nil {
		return nil, err
	}
	e, err := a.store.ForgetKey(ctx, storeKey, req.GetForce())
	if errors.Is(err, ErrInProgress) {
		msg := fmt.Sprintf("key %q in scope %q is still running its first execution", req.GetKey(), req.GetScope())
		if e.Token != "" {
			msg += fmt.Sprintf(" (owner %s, lease until %s)", e.Token, e.LeaseExpires.UTC().Format(time.RFC3339Nano))
		}
		return nil, status.Error(codes.FailedPrecondition, msg+"; wait for it to finish, or set force if its owner is known to be gone (the next call then runs beside it)")
	}
	if err != nil {
		return nil, adminError(ctx, "forget", err)
	}
	resp := &idempotencyv1.ForgetRecordResponse{}
	switch e.State {
	case Pending, Acquired:
		resp.State = idempotencyv1.RecordState_RECORD_STATE_PENDING
	case Completed:
		resp.State = idempotencyv1.RecordState_RECORD_STATE_COMPLETED
	default:
		return nil, status.Errorf(codes.NotFound, "key %q holds nothing in scope %q: nothing to forget (the scope is what the server's WithScope gave the call)", req.GetKey(), req.GetScope())
	}
	return resp, nil
}

func (a *adminServer) Stats(ctx context.Context, _ *idempotencyv1.StatsRequest) (*idempotencyv1.StatsResponse, error) {
	s, err := a.store.Summary(ctx)
	if err != nil {
		return nil, adminError(ctx, "stats", err)
	}
	known := func(n int64) *int64 {
		if n < 0 {
			return nil
		}
		return &n
	}
	return &idempotencyv1.StatsResponse{
		Store:       s.Store,
		Records:     known(s.Records),
		Pending:     known(s.Pending),
		Bytes:       known(s.Bytes),
		Approximate: s.Approximate,
		Extra:       s.Extra,
	}, nil
}
