// Package cpuclock reads the CPU time of the running process, for the
// benchmarks' cpu-µs/op metric in every module of this repository.
package cpuclock

import "time"

// Process returns the process's CPU time, user and system, and false where
// the platform does not tell.
func Process() (time.Duration, bool) { return process() }
