package redisstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/grpcidem/idempotency"
)

var _ idempotency.Inspector = (*Store)(nil)

// forgetScript: KEYS[1] the key and channel; ARGV[1] "1" to forget a
// pending key too. It returns {0} for an absent key, {1, value, pttl} for a
// pending key it left alone, {2, value, pttl} for what it deleted. Deleting
// a pending key wakes its waiters, as Release does.
var forgetScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if not v then
  return {0}
end
local pttl = redis.call('PTTL', KEYS[1])
local tag = string.sub(v, 1, 1)
if tag == 'P' and ARGV[1] ~= '1' then
  return {1, v, pttl}
end
redis.call('DEL', KEYS[1])
if tag == 'P' and string.sub(v, 2, 2) == 'W' then
  local colon = string.find(v, ':', 3, true)
  if colon then
    local n = tonumber(string.sub(v, 3, colon - 1))
    if n then
      redis.call('PUBLISH', KEYS[1], string.sub(v, colon + 1, colon + n))
    end
  end
end
return {2, v, pttl}
`)

// ForgetKey implements idempotency.Inspector, in one script.
func (s *Store) ForgetKey(ctx context.Context, key string, force bool) (idempotency.Entry, error) {
	if s.closed.Load() {
		return idempotency.Entry{}, idempotency.ErrClosed
	}
	if err := checkKey(key); err != nil {
		return idempotency.Entry{}, err
	}
	arg := "0"
	if force {
		arg = "1"
	}
	res, err := forgetScript.Run(ctx, s.client, []string{s.redisKey(key)}, arg).Slice()
	if err != nil {
		return idempotency.Entry{}, fmt.Errorf("redisstore: forget: %w", err)
	}
	if len(res) == 1 {
		return idempotency.Entry{State: idempotency.Absent}, nil
	}
	e, err := decodeReply(res, time.Now())
	if err != nil {
		return idempotency.Entry{}, fmt.Errorf("redisstore: forget %q: %w", key, err)
	}
	if n, _ := res[0].(int64); n == 1 {
		return e, fmt.Errorf("%w: its owner holds the key under a lease until %s", idempotency.ErrInProgress, e.LeaseExpires.UTC().Format(time.RFC3339Nano))
	}
	return e, nil
}

// globEscape escapes the characters that Redis's MATCH patterns give a
// meaning, so that s matches itself only.
func globEscape(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '*', '?', '[', ']', '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// hashTagLen is the length of the hash tag redisKey puts after the prefix:
// '{', eight hex digits, '}'.
const hashTagLen = 10

// storeKey is the store key of a Redis key of this Store's, or false.
func (s *Store) storeKey(rk string) (string, bool) {
	if len(rk) < len(s.prefix)+hashTagLen || !strings.HasPrefix(rk, s.prefix) {
		return "", false
	}
	key := rk[len(s.prefix)+hashTagLen:]
	return key, s.redisKey(key) == rk
}

// A listing's position, which its page token carries: the address of the
// node being scanned ("" for a client that is not a cluster's), its SCAN
// cursor, and the keys a SCAN returned beyond the page that asked for them.
type listPosition struct {
	node     string
	cursor   uint64
	left     []string
	finished bool // every node was scanned: only left remains
}

const listTokenTag = 'r'

func (p listPosition) token() string {
	b := []byte{listTokenTag, 0}
	if p.finished {
		b[1] = 1
	}
	b = binary.AppendUvarint(b, uint64(len(p.node)))
	b = append(b, p.node...)
	b = binary.AppendUvarint(b, p.cursor)
	b = binary.AppendUvarint(b, uint64(len(p.left)))
	for _, k := range p.left {
		b = binary.AppendUvarint(b, uint64(len(k)))
		b = append(b, k...)
	}
	return string(b)
}

func parseListToken(token string) (listPosition, error) {
	bad := fmt.Errorf("%w: %q was not made by this store", idempotency.ErrBadPageToken, token)
	b := []byte(token)
	if len(b) < 2 || b[0] != listTokenTag || b[1] > 1 {
		return listPosition{}, bad
	}
	var p listPosition
	p.finished = b[1] == 1
	b = b[2:]
	str := func() (string, bool) {
		n, m := binary.Uvarint(b)
		if m <= 0 || n > uint64(len(b)-m) {
			return "", false
		}
		s := string(b[m : m+int(n)])
		b = b[m+int(n):]
		return s, true
	}
	var ok bool
	if p.node, ok = str(); !ok {
		return listPosition{}, bad
	}
	var m int
	if p.cursor, m = binary.Uvarint(b); m <= 0 {
		return listPosition{}, bad
	}
	b = b[m:]
	n, m := binary.Uvarint(b)
	if m <= 0 || n > uint64(len(b)) {
		return listPosition{}, bad
	}
	b = b[m:]
	for range n {
		k, ok := str()
		if !ok {
			return listPosition{}, bad
		}
		p.left = append(p.left, k)
	}
	if len(b) != 0 {
		return listPosition{}, bad
	}
	return p, nil
}

// nodes returns the servers to scan, sorted by address: every master of a
// cluster, or the one server of another client.
func (s *Store) nodes(ctx context.Context) ([]string, map[string]redis.Cmdable, error) {
	cc, ok := s.client.(*redis.ClusterClient)
	if !ok {
		return []string{""}, map[string]redis.Cmdable{"": s.client}, nil
	}
	var mu sync.Mutex
	clients := map[string]redis.Cmdable{}
	err := cc.ForEachMaster(ctx, func(ctx context.Context, n *redis.Client) error {
		mu.Lock()
		clients[n.Options().Addr] = n
		mu.Unlock()
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	addrs := make([]string, 0, len(clients))
	for a := range clients {
		addrs = append(addrs, a)
	}
	slices.Sort(addrs)
	return addrs, clients, nil
}

// maxScansPerPage bounds the SCAN round trips of one page, so that a page
// of a sparse prefix in a large keyspace comes back in good time (short,
// with a next page) rather than after a scan of everything.
const maxScansPerPage = 64

// ListKeys implements idempotency.Inspector with SCAN and a MATCH pattern
// of the prefix, on every master of a cluster in turn. Keys come in SCAN
// order, each page sorted; SCAN may return a key twice, so a key may come
// again on a later page (storetest.UnorderedListing). Every key that exists
// for the whole listing is listed. A page may come back short, or empty,
// with a next page: SCAN of a large keyspace takes several round trips,
// and one page takes at most 64. A page token names the node being scanned;
// after a failover in a cluster it is refused (idempotency.ErrBadPageToken),
// and the listing starts over.
func (s *Store) ListKeys(ctx context.Context, prefix, pageToken string, limit int) ([]idempotency.ListedKey, string, error) {
	if s.closed.Load() {
		return nil, "", idempotency.ErrClosed
	}
	if limit < 1 {
		return nil, "", fmt.Errorf("redisstore: ListKeys needs a limit of at least 1, got %d", limit)
	}
	nodes, clients, err := s.nodes(ctx)
	if err != nil {
		return nil, "", fmt.Errorf("redisstore: list: find the cluster's masters: %w", err)
	}
	pos := listPosition{node: nodes[0]}
	if pageToken != "" {
		if pos, err = parseListToken(pageToken); err != nil {
			return nil, "", err
		}
	}
	at := slices.Index(nodes, pos.node)
	if at < 0 && !pos.finished {
		return nil, "", fmt.Errorf("%w: the Redis node %s the listing was scanning is no longer a master", idempotency.ErrBadPageToken, pos.node)
	}
	pattern := globEscape(s.prefix) + "{????????}" + globEscape(prefix) + "*"
	found := pos.left
	pos.left = nil
	done := pos.finished
	for scans := 0; !done && len(found) < limit && scans < maxScansPerPage; scans++ {
		keys, cursor, err := clients[nodes[at]].Scan(ctx, pos.cursor, pattern, int64(max(limit-len(found), 16))).Result()
		if err != nil {
			return nil, "", fmt.Errorf("redisstore: list: scan %s: %w", nodes[at], err)
		}
		found = append(found, keys...)
		pos.cursor = cursor
		if cursor == 0 {
			if at++; at == len(nodes) {
				done = true
				break
			}
			pos.node = nodes[at]
		}
	}
	// By store key, the hash tag left out.
	byKey := func(rk string) string { return rk[min(len(rk), len(s.prefix)+hashTagLen):] }
	slices.SortFunc(found, func(a, b string) int { return strings.Compare(byKey(a), byKey(b)) })
	found = slices.Compact(found)
	if len(found) > limit {
		pos.left = slices.Clone(found[limit:])
		found = found[:limit]
		pos.finished, done = done, false
	}
	listed, err := s.fetch(ctx, found, prefix)
	if err != nil {
		return nil, "", err
	}
	if done {
		return listed, "", nil
	}
	return listed, pos.token(), nil
}

// fetch reads the values of Redis keys in one pipeline, and returns those
// that are still there, this store's and under prefix, as listed keys. The
// keys a page token carries over are the caller's to send back, altered or
// with another prefix: only the check here keeps them in the listing's
// prefix.
func (s *Store) fetch(ctx context.Context, rks []string, prefix string) ([]idempotency.ListedKey, error) {
	rks = slices.DeleteFunc(rks, func(rk string) bool {
		key, ok := s.storeKey(rk)
		return !ok || !strings.HasPrefix(key, prefix)
	})
	if len(rks) == 0 {
		return nil, nil
	}
	pipe := s.client.Pipeline()
	gets := make([]*redis.StringCmd, len(rks))
	ttls := make([]*redis.DurationCmd, len(rks))
	for i, rk := range rks {
		gets[i] = pipe.Get(ctx, rk)
		ttls[i] = pipe.PTTL(ctx, rk)
	}
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, fmt.Errorf("redisstore: list: read the keys: %w", err)
	}
	now := time.Now()
	listed := make([]idempotency.ListedKey, 0, len(rks))
	for i, rk := range rks {
		key, _ := s.storeKey(rk)
		v, err := gets[i].Result()
		if err != nil {
			continue // gone since the scan
		}
		ttl := ttls[i].Val()
		if ttl < 0 {
			continue // gone since the read, or no expiry: not this store's
		}
		e, err := decode(v, ttl.Milliseconds(), now)
		if err != nil {
			continue // a value this store did not write
		}
		listed = append(listed, idempotency.ListedKey{Key: key, Entry: e})
	}
	return listed, nil
}

// Summary implements idempotency.Inspector. Redis cannot count one
// prefix's keys without scanning them, so Records, Pending and Bytes are
// unknown (-1); Extra has the figures of the whole Redis (every master of a
// cluster): "redis_keys" (DBSIZE, every prefix and database user included)
// and "redis_used_memory_bytes".
func (s *Store) Summary(ctx context.Context) (idempotency.StoreSummary, error) {
	if s.closed.Load() {
		return idempotency.StoreSummary{}, idempotency.ErrClosed
	}
	nodes, clients, err := s.nodes(ctx)
	if err != nil {
		return idempotency.StoreSummary{}, fmt.Errorf("redisstore: stats: find the cluster's masters: %w", err)
	}
	var keys, mem int64
	for _, n := range nodes {
		c := clients[n]
		size, err := c.DBSize(ctx).Result()
		if err != nil {
			return idempotency.StoreSummary{}, fmt.Errorf("redisstore: stats: %w", err)
		}
		keys += size
		info, err := c.Info(ctx, "memory").Result()
		if err != nil {
			return idempotency.StoreSummary{}, fmt.Errorf("redisstore: stats: %w", err)
		}
		mem += infoField(info, "used_memory")
	}
	return idempotency.StoreSummary{
		Store: "redis", Records: -1, Pending: -1, Bytes: -1,
		Extra: map[string]int64{"redis_keys": keys, "redis_used_memory_bytes": mem},
	}, nil
}

// infoField returns a numeric field of an INFO reply, 0 if absent.
func infoField(info, name string) int64 {
	for line := range strings.SplitSeq(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+":"); ok {
			var n int64
			if _, err := fmt.Sscan(v, &n); err == nil {
				return n
			}
		}
	}
	return 0
}
