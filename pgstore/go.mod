module github.com/grpcidem/idempotency/pgstore

go 1.26

require github.com/grpcidem/idempotency v0.0.0

replace github.com/grpcidem/idempotency => ../
