//go:build windows || plan9 || solaris || aix || android

package idempotency

import "os"

// unlockFile does nothing where bbolt does not lock with flock: closing the
// file is all this package can do there.
func unlockFile(*os.File) error { return nil }
