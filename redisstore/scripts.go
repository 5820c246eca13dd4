package redisstore

import "github.com/redis/go-redis/v9"

// The value of a store key is one string, so that every script touches one
// Redis key and works unchanged on a cluster:
//
//	pending:   'P' flag owner fingerprint
//	completed: 'C' owner record
//
// where owner is the decimal length of the token, ':', and the token, and flag
// is '-', or 'W' once a Store has a waiter subscribed to the key's channel.
// Complete and Release publish only when the flag says someone listens, so a
// first execution nobody waits for costs no pub/sub traffic.
//
// The owner checks read the head of the value with GETRANGE, never the whole
// record. They compare the owner field including its length, so one token
// cannot pass for another that it is a prefix of.
//
// go-redis retries a command whose connection failed, which may run a
// script twice. The scripts make that harmless for the owner: Reserve finds
// its own token and reports the key acquired, Renew finds the key pending
// under its own token and extends it, and Complete finds its own identical
// record and succeeds.

// reserveScript: KEYS[1] the key; ARGV[1] the pending value, ARGV[2] the lease
// in milliseconds. It returns {1} when it made the key pending, or
// {2, value, pttl} for what holds the key.
var reserveScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1}
end
return {2, v, redis.call('PTTL', KEYS[1])}
`)

// lookupScript: KEYS[1] the key. It returns {0} for an absent key, or
// {2, value, pttl}.
var lookupScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if not v then
  return {0}
end
return {2, v, redis.call('PTTL', KEYS[1])}
`)

// completeScript: KEYS[1] the key, which is also its channel; ARGV[1] the
// owner field, ARGV[2] the completed value, ARGV[3] the retention in
// milliseconds, ARGV[4] the token, and ARGV[5], if given, asks that a record
// already stored by this owner be written again (with its TTL kept), so that
// a WAIT after the script covers it. It returns 1 when the record is stored
// (or was, by this owner, byte for byte), 0 when another owner holds the key.
var completeScript = redis.NewScript(`
local head = redis.call('GETRANGE', KEYS[1], 0, 1 + #ARGV[1])
local wake = false
if head ~= '' then
  local tag = string.sub(head, 1, 1)
  if tag == 'C' and string.sub(head, 2, 1 + #ARGV[1]) == ARGV[1] then
    if redis.call('GET', KEYS[1]) == ARGV[2] then
      if ARGV[5] then
        redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
      end
      return 1
    end
    return 0
  end
  if tag ~= 'P' or string.sub(head, 3, 2 + #ARGV[1]) ~= ARGV[1] then
    return 0
  end
  wake = string.sub(head, 2, 2) == 'W'
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if wake then
  redis.call('PUBLISH', KEYS[1], ARGV[4])
end
return 1
`)

// releaseScript: KEYS[1] the key and channel; ARGV[1] the owner field, ARGV[2]
// the token. It returns 1 when it deleted the key, 0 when the key is not
// pending under the token.
var releaseScript = redis.NewScript(`
local head = redis.call('GETRANGE', KEYS[1], 0, 1 + #ARGV[1])
if string.sub(head, 1, 1) ~= 'P' or string.sub(head, 3, 2 + #ARGV[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if string.sub(head, 2, 2) == 'W' then
  redis.call('PUBLISH', KEYS[1], ARGV[2])
end
return 1
`)

// renewScript: KEYS[1] the key; ARGV[1] the owner field, ARGV[2] the lease in
// milliseconds, ARGV[3] the pending value of the owner's claim. It extends the
// lease if the key is pending under the owner; if the key is absent (the
// owner's lease ran out in Redis and nobody took the key, or it was
// released), it takes it back under the claim, as Reserve would. It returns 1
// in both cases, 0 when another owner holds the key or it is completed. A
// taken-back key has no waiter flag: a waiter that saw the old lease wakes at
// its end, finds the key pending again, and sets the flag anew.
var renewScript = redis.NewScript(`
local head = redis.call('GETRANGE', KEYS[1], 0, 1 + #ARGV[1])
if head == '' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
  return 1
end
if string.sub(head, 1, 1) ~= 'P' or string.sub(head, 3, 2 + #ARGV[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
`)

// watchScript: KEYS[1] the key; ARGV[1] the owner field. A waiter runs it
// after subscribing to the key's channel: if the key is still pending under
// the owner it sets the waiter flag (SETRANGE keeps the TTL) and returns
// {1, pttl}; otherwise {0}.
var watchScript = redis.NewScript(`
local head = redis.call('GETRANGE', KEYS[1], 0, 1 + #ARGV[1])
if string.sub(head, 1, 1) ~= 'P' or string.sub(head, 3, 2 + #ARGV[1]) ~= ARGV[1] then
  return {0}
end
if string.sub(head, 2, 2) ~= 'W' then
  redis.call('SETRANGE', KEYS[1], 1, 'W')
end
return {1, redis.call('PTTL', KEYS[1])}
`)
