package api

import "time"

// StreamEvent is one event of GET /v1/events: a machine's event (type machine.<its
// type>: machine.launch, machine.start, machine.exit...) or a build entering a state
// (build.<state>: build.queued, build.running, build.succeeded...). A machine's event
// names its app and machine, a build's its project and build; the other two are "".
// With follow=true each is sent as a server-sent event: "id: <ID>", "event: <Type>",
// "data: <this, as one line of JSON>".
type StreamEvent struct {
	// ID orders the events; after=ID (or the Last-Event-ID header) resumes after it.
	ID        int64     `json:"id"`
	Time      time.Time `json:"time"`
	Type      string    `json:"type"`
	App       string    `json:"app"`
	MachineID string    `json:"machine_id"`
	Project   string    `json:"project"`
	BuildID   string    `json:"build_id"`
	Host      string    `json:"host"`
	State     string    `json:"state"`
	// Message says more, where there is more to say: an exit's code, why a build failed.
	Message string `json:"message"`
}

// EventList is GET /v1/events without follow: the newest events asked for, oldest
// first, and Next, the ID to pass as after= for what comes next.
type EventList struct {
	Events []StreamEvent `json:"events"`
	Next   int64         `json:"next"`
}
