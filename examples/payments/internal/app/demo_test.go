package app

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func smallDemo(t *testing.T) demoConfig {
	return demoConfig{
		unary: 6, streams: 2, parts: 2, concurrency: 4,
		dropEvery: 2, failEvery: 0, doubleEvery: 3,
		delay: 10 * time.Millisecond, maxAttempts: 10,
		dir: t.TempDir(), backoff: time.Millisecond, maxBackoff: 10 * time.Millisecond, timeout: time.Minute,
	}
}

// The demo's verdict must be able to fail: against a server whose
// idempotency is switched off, lost answers and double submits execute
// payments again, and the demo must say so and fail.
func TestDemoCatchesDuplicateExecutions(t *testing.T) {
	c := smallDemo(t)
	c.noIdempotency = true
	var out bytes.Buffer
	err := runDemo(context.Background(), c, &out)
	require.ErrorContains(t, err, "found", out.String())
	require.Contains(t, out.String(), "MISMATCH")
	require.Contains(t, out.String(), "executed 2 times")
	require.Contains(t, out.String(), "was not replayed", "the retry after the restart ran again")
}

func TestDemoSmall(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, runDemo(context.Background(), smallDemo(t), &out), out.String())
	require.Contains(t, out.String(), "Handler executions: 12 for 12 logical payments: OK.")
}

func TestEvery(t *testing.T) {
	for n, want := range map[int]string{1: "every call", 2: "every 2nd call", 3: "every 3rd call", 4: "every 4th call", 11: "every 11th call", 12: "every 12th call", 21: "every 21st call", 112: "every 112th call"} {
		require.Equal(t, want, every(n, "call"))
	}
}

func TestParts(t *testing.T) {
	amounts := func(pm Payment) []int64 {
		var a []int64
		for _, r := range parts(pm) {
			a = append(a, r.GetAmountCents())
		}
		return a
	}
	require.Equal(t, []int64{34, 33, 33}, amounts(Payment{AmountCents: 100, Parts: 3}))
	require.Equal(t, []int64{2}, amounts(Payment{AmountCents: 2, Parts: 3}), "too small to split: sent whole")
	require.Equal(t, []int64{0}, amounts(Payment{AmountCents: 0, Parts: 3}), "left for the server to refuse")
	require.Equal(t, []int64{5}, amounts(Payment{AmountCents: 5, Parts: 0}))
}
