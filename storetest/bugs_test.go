package storetest_test

import (
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// A suite that cannot fail proves nothing. TestSuiteCatchesBugs runs the
// reference store with one bug at a time switched on, in a child process
// of this test binary, and checks that the subtest meant to catch the bug
// fails, and for the expected reason.
func TestSuiteCatchesBugs(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the suite again in child processes")
	}
	if os.Getenv("STORETEST_REFERENCE_BUGS") != "" {
		t.Skip("already in a child process")
	}
	bugs := []struct {
		bug     string
		test    string // which run of the suite: TestReference or TestReferenceShared
		subtest string // the subtest that must fail
		message string // a regexp its failure must match
	}{
		{"no-retention-expiry", "TestReference", "Retention/ExpiredIsAbsent", `Lookup after the retention: still completed`},
		{"no-lease-expiry", "TestReference", "Lease/Takeover", `still pending`},
		{"no-lease-expiry", "TestReference", "Complete/AfterLeaseRanOut", `Lookup after the lease ran out: still pending`},
		{"nul-truncates-key", "TestReference", "Data/BinaryKeys", `before its Reserve: got completed`},
		{"shares-slices", "TestReference", "Data/ReturnedSlicesAreCallers", `after scribbling on the Fingerprint`},
		{"expires-unset", "TestReference", "Reserve/Completed", `Completed Expires is not set`},
		{"drops-fingerprint", "TestReference", "Reserve/Pending", `want the owner's fingerprint`},
		{"ignores-close", "TestReference", "Close/ErrClosed", `Reserve after Close: <nil>, want ErrClosed`},
		{"racy-reserve", "TestReference", "Concurrency/OneWinner", `both acquired it`},
		{"racy-reserve", "TestReferenceShared", "Shared/OneWinner", `both acquired it`},
		{"renew-ignores-token", "TestReference", "Renew/WrongToken", `Renew by another token: <nil>, want ErrNotOwner`},
		{"renew-does-nothing", "TestReference", "Renew/ExtendsLease", `Lookup after the original lease, renewed: got absent`},
		{"renew-no-takeback", "TestReference", "Renew/TakesBackAbsent", `Renew of an absent key: idempotency: key is not held by this owner`},
		{"refuses-absent-complete", "TestReference", "Complete/AbsentKey", `want nil`},
		{"refuses-absent-complete", "TestReference", "Complete/AfterLeaseRanOut", `nobody having taken over: .*want nil`},
		{"no-fencing", "TestReference", "Lease/StaleOwnerFenced", `Complete by the stale owner: <nil>, want ErrNotOwner`},
		{"no-fencing", "TestReference", "Complete/WrongToken", `want ErrNotOwner`},
		{"no-fencing", "TestReferenceShared", "Shared/StaleOwnerFenced", `want ErrNotOwner`},
		{"release-ignores-token", "TestReference", "Release/WrongToken", `want ErrNotOwner`},
		{"release-ignores-expiry", "TestReference", "Release/AfterLeaseRanOut", `after its lease ran out, nobody having taken over: <nil>, want ErrNotOwner`},
		{"no-bounds", "TestReference", "Bounds/Durations", `Reserve with a lease of 0s: <nil>, want an error`},
		{"no-bounds", "TestReference", "Bounds/KeyTooLong", `want ErrKeyTooLong`},
		{"no-bounds", "TestReference", "Data/EmptyToken", `Reserve with an empty token: acquired`},
		{"complete-no-wake", "TestReference", "Wait/Complete", `after Complete: Wait has not returned`},
		{"complete-no-wake", "TestReference", "Wait/ManyWaiters", `after Complete: Wait has not returned`},
		{"complete-no-wake", "TestReferenceShared", "Shared/WaitComplete", `Wait has not returned`},
		{"release-no-wake", "TestReference", "Wait/Release", `after Release: Wait has not returned`},
		{"release-no-wake", "TestReferenceShared", "Shared/WaitRelease", `Wait has not returned`},
		{"misses-earlier-change", "TestReference", "Wait/ChangedBeforeWait", `Wait called after Complete: context deadline exceeded`},
		{"wait-ignores-token", "TestReference", "Wait/ChangedBeforeWait", `Wait called after Release and Reserve by another token: context deadline exceeded`},
		{"wait-ignores-lease", "TestReference", "Wait/LeaseExpiry", `Wait for a lease to run out: Wait has not returned`},
		{"wait-ignores-context", "TestReference", "Wait/ContextEnds", `Wait with a deadline: Wait has not returned`},
		{"truncates-records", "TestReference", "Data/LargeRecords", `4194304-byte record: .*got 1048576 bytes`},
		{"not-shared", "TestReferenceShared", "Shared/SeeEachOther", `Lookup on instance B: got absent`},
		{"not-shared", "TestReferenceShared", "Shared/OneWinner", `both acquired it`},
	}

	// The children mostly sleep, waiting for what a bug keeps from
	// happening; a few at a time keep a small machine responsive.
	type result struct {
		out []byte
		err error
	}
	results := make([]result, len(bugs))
	sem := make(chan struct{}, 6)
	var wg sync.WaitGroup
	for i, b := range bugs {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			run := "^" + b.test + "$/^storetest$"
			for _, part := range strings.Split(b.subtest, "/") {
				run += "/^" + regexp.QuoteMeta(part) + "$"
			}
			cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run="+run, "-test.count=1", "-test.timeout=3m")
			cmd.Env = append(os.Environ(), "STORETEST_REFERENCE_BUGS="+b.bug)
			results[i].out, results[i].err = cmd.CombinedOutput()
		})
	}
	wg.Wait()

	for i, b := range bugs {
		t.Run(b.bug+"/"+b.subtest, func(t *testing.T) {
			out := string(results[i].out)
			if results[i].err == nil {
				t.Fatalf("the suite passed a store with bug %q; output:\n%s", b.bug, out)
			}
			if !strings.Contains(out, "--- FAIL: "+b.test+"/storetest/"+b.subtest+" ") {
				t.Fatalf("with bug %q, subtest %s did not fail; output:\n%s", b.bug, b.subtest, out)
			}
			if !regexp.MustCompile(b.message).MatchString(out) {
				t.Fatalf("with bug %q, subtest %s failed without a message matching %q; output:\n%s", b.bug, b.subtest, b.message, out)
			}
		})
	}
}
