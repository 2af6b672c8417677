package store

import (
	"context"
	"encoding/json"
	"time"
)

// Release states. A release is pending until its deploy starts, running while it
// converges the app, and ends succeeded, failed (stopped before anything changed, or
// could not roll back) or rolled_back (the previous release serves again).
const (
	ReleasePending    = "pending"
	ReleaseRunning    = "running"
	ReleaseSucceeded  = "succeeded"
	ReleaseFailed     = "failed"
	ReleaseRolledBack = "rolled_back"
)

// Release is one deploy of an app, numbered per app from 1: what was deployed (image,
// config, secrets version), by whom, and how it went. The deploy's own progress is kept
// in it so that a server killed mid-deploy resumes it.
type Release struct {
	App     string `json:"app"`
	Version int    `json:"version"`
	State   string `json:"state"`
	// Strategy is the one the deploy uses: rolling, immediate, canary or bluegreen.
	Strategy string `json:"strategy"`
	// Image is the image reference deployed, with its digest.
	Image string `json:"image"`
	// Config is the app's config as deployed (appconfig.Config as JSON).
	Config         json.RawMessage `json:"config"`
	SecretsVersion int             `json:"secrets_version"`
	// Token is the ID of the token that asked for the deploy.
	Token string `json:"token,omitempty"`
	// RollbackOf is the release a rollback deploys again; 0 for a deploy.
	RollbackOf int `json:"rollback_of,omitempty"`
	// Progress is the deploy's own record of where it is, owned by the deploy package.
	Progress json.RawMessage `json:"progress,omitempty"`
	// Message says how it ended, or why it failed.
	Message   string    `json:"message,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// Releases persists releases. A release's state changes only through UpdateRelease's
// compare and swap.
type Releases interface {
	// CreateRelease gives r the app's next version (one more than the highest it has
	// had, even if that one was deleted), inserts it and returns it as stored.
	CreateRelease(ctx context.Context, r Release) (Release, error)
	// GetRelease returns one release; an unknown one is ErrNotFound.
	GetRelease(ctx context.Context, app string, version int) (Release, error)
	// ListReleases lists an app's releases, newest first, at most limit (0: all).
	ListReleases(ctx context.Context, app string, limit int) ([]Release, error)
	// UpdateRelease writes r's state, progress and message if the stored release is
	// still in state from; otherwise it is ErrConflict and nothing changes.
	UpdateRelease(ctx context.Context, r Release, from string) error
	// ReleasesInState lists the releases of every app in any of the states, oldest
	// first.
	ReleasesInState(ctx context.Context, states ...string) ([]Release, error)
	// PruneReleases deletes an app's releases older than its newest keep, those that
	// ended only and never its latest that succeeded, and says how many went.
	PruneReleases(ctx context.Context, app string, keep int) (int, error)
}

// SecretsVersion is one version of an app's secrets, sealed: the store never sees them
// in clear.
type SecretsVersion struct {
	App       string    `json:"app"`
	Version   int       `json:"version"`
	Sealed    []byte    `json:"-"`
	CreatedAt time.Time `json:"created_at"`
}

// Secrets persists the sealed versions of each app's secrets.
type Secrets interface {
	// PutSecrets stores sealed as version prev+1 of the app's secrets if prev is still
	// the latest (0 when it has none); otherwise it is ErrConflict and nothing changes.
	PutSecrets(ctx context.Context, app string, prev int, sealed []byte) (int, error)
	// SecretsAt returns a version of the app's secrets, or the latest for version 0. An
	// app without secrets yields a zero SecretsVersion (Version 0) and no error; an
	// unknown version of an app that has some is ErrNotFound.
	SecretsAt(ctx context.Context, app string, version int) (SecretsVersion, error)
}
