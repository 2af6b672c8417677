package daemon

// cleanups is a stack of what undoes each resource the server acquired, pushed as each
// one is made. unwind runs them newest first, once: on a failed start and at shutdown
// alike, so no path forgets one.
type cleanups struct {
	fns []func()
}

// push adds the cleanup of the resource just made.
func (c *cleanups) push(f func()) { c.fns = append(c.fns, f) }

// unwind runs the cleanups newest first and forgets them.
func (c *cleanups) unwind() {
	for i := len(c.fns) - 1; i >= 0; i-- {
		c.fns[i]()
	}
	c.fns = nil
}
