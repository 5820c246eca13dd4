module github.com/grpcidem/idempotency/redisstore

go 1.26.0

require github.com/grpcidem/idempotency v0.0.0

replace github.com/grpcidem/idempotency => ../
