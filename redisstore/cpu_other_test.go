//go:build !unix

package redisstore_test

import "time"

// processCPU is unknown here: the benchmarks leave out cpu-µs/op.
func processCPU() (time.Duration, bool) { return 0, false }
