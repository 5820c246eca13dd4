package idempotency_test

import (
	"syscall"
	"testing"
	"time"

	"github.com/grpcidem/idempotency/internal/cpuclock"
)

// BenchmarkBlockingHandler measures what blocking in a system call costs a
// call beyond the call and the system call themselves: a 300 µs
// nanosleep(2) alone (raw), and made by the handler of a call without the
// interceptor (in-handler). An fsync blocks the same way, so the difference
// is part of what a first execution on a durable store costs beyond a bare
// call and a lone commit, with no disk in it: while the handler blocks,
// nothing else in the process runs, its threads go to sleep, and the
// goroutines that carry the answer back must wake them.
//
//	go test -run '^$' -bench 'BenchmarkBlockingHandler|BenchmarkUnary/none/baseline/p1$' -count 6 .
func BenchmarkBlockingHandler(b *testing.B) {
	b.Run("raw", func(b *testing.B) {
		cpu, cpuOK := cpuclock.Process()
		for b.Loop() {
			nap()
		}
		if now, ok := cpuclock.Process(); ok && cpuOK {
			b.ReportMetric(float64((now-cpu).Microseconds())/float64(b.N), "cpu-µs/op")
		}
	})
	b.Run("in-handler", func(b *testing.B) {
		runCalls(b, serveBench(b, committingPayments{commit: nap}), 1, nil)
	})
}

// nap blocks its thread in one system call for 300 µs.
func nap() {
	ts := syscall.NsecToTimespec(int64(300 * time.Microsecond))
	_ = syscall.Nanosleep(&ts, nil)
}
