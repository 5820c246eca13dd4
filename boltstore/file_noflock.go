//go:build windows || plan9 || solaris || aix || android

package boltstore

import "os"

// unlockFile does nothing where bbolt does not lock with flock: closing the
// file is all this package can do there.
func unlockFile(*os.File) error { return nil }

// lockShared does not lock where bbolt does not lock with flock: stop the
// server before checking or salvaging its file.
func lockShared(*os.File) (bool, error) { return true, nil }
