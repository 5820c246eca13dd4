package redisstore

import "github.com/redis/go-redis/v9"

// RedisKey exposes the Redis key of a store key to the black-box tests, which
// inspect and tamper with what the store wrote.
func RedisKey(s *Store, key string) string { return s.redisKey(key) }

// SetScripter makes s run its scripts through sc, such as a go-redis
// AutoPipeliner, for the benchmark that compares them.
func SetScripter(s *Store, sc redis.Scripter) { s.scripts = sc }
