package server

import "time"

// SetEventKeepalive makes the event stream's keepalive come every d until the returned
// function restores it: a test sees one without waiting 15 s.
func SetEventKeepalive(d time.Duration) (restore func()) {
	old := eventKeepalive
	eventKeepalive = d
	return func() { eventKeepalive = old }
}
