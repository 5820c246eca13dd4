package redisstore

// RedisKey exposes the Redis key of a store key to the black-box tests, which
// inspect and tamper with what the store wrote.
func RedisKey(s *Store, key string) string { return s.redisKey(key) }
