//go:build !windows && !plan9 && !solaris && !aix && !android

package boltstore

import (
	"os"
	"syscall"
)

// unlockFile releases the flock that bbolt took on f. Closing f alone does
// not, while bbolt's memory map of the file lives: the map holds the open
// file, and the lock with it.
func unlockFile(f *os.File) error {
	return syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
}

// lockShared takes a shared flock on f, as a bbolt reader does, or fails at
// once if a bbolt writer (a running server) holds the file.
func lockShared(f *os.File) (bool, error) {
	err := syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB)
	if err == syscall.EWOULDBLOCK {
		return false, nil
	}
	return err == nil, err
}
