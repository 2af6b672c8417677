package connlimit

import "syscall"

// OpenFileLimit is how many files this process may hold open (RLIMIT_NOFILE's soft
// limit), or 0 where it cannot be read. Go raises the soft limit to one below the hard
// one when a program starts (package syscall's init; children get the original back),
// so this is, give or take one, what the operator allowed.
func OpenFileLimit() uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0
	}
	return rl.Cur
}
