package api

import "time"

// DeployRequest is POST /v1/apps/{app}/deploys and POST /v1/apps/{app}/plan: the app's
// fly.toml or kiln.toml as text, and the image to run.
type DeployRequest struct {
	// Config is the file's text; ConfigName its name, for errors (fly.toml by default).
	Config     string `json:"config"`
	ConfigName string `json:"config_name,omitempty"`
	// Image is the image to deploy, best with its digest; default the config's
	// [build] image.
	Image string `json:"image,omitempty"`
	// Strategy overrides [deploy] strategy.
	Strategy string `json:"strategy,omitempty"`
	// Counts sets how many machines a process group has; a group not named keeps the
	// count of the latest release (1 for a new group, or [kiln] counts).
	Counts map[string]int `json:"counts,omitempty"`
	// LocalFiles are the contents (base64) of the config's [[files]] local_path
	// entries, by that path: the files are on the deployer's side.
	LocalFiles map[string]string `json:"local_files,omitempty"`
	// ExpectPlan, on a deploy, is the digest of the plan the caller approved: if the
	// plan is no longer that one (a machine changed meanwhile), the deploy is refused.
	ExpectPlan string `json:"expect_plan,omitempty"`
}

// FieldDiff is one changed field of a machine's config, by JSON path.
type FieldDiff struct {
	Path string `json:"path"`
	Old  string `json:"old,omitempty"`
	New  string `json:"new,omitempty"`
}

// PlanStep is what a deploy does to one machine: none, update, replace, create or
// destroy.
type PlanStep struct {
	Group   string      `json:"group"`
	Machine string      `json:"machine,omitempty"`
	Change  string      `json:"change"`
	Diff    []FieldDiff `json:"diff,omitempty"`
}

// Plan is what a deploy changes.
type Plan struct {
	Strategy string     `json:"strategy"`
	Steps    []PlanStep `json:"steps"`
	// Digest names this plan: what a deploy's expect_plan compares.
	Digest string `json:"digest"`
}

// Release is one deploy of an app.
type Release struct {
	App            string         `json:"app"`
	Version        int            `json:"version"`
	State          string         `json:"state"` // pending, running, succeeded, failed, rolled_back
	Strategy       string         `json:"strategy"`
	Image          string         `json:"image"`
	SecretsVersion int            `json:"secrets_version"`
	Counts         map[string]int `json:"counts,omitempty"`
	Token          string         `json:"token,omitempty"`
	RollbackOf     int            `json:"rollback_of,omitempty"`
	Message        string         `json:"message,omitempty"`
	CreatedAt      time.Time      `json:"created_at"`
	UpdatedAt      time.Time      `json:"updated_at"`
}

// DeployResponse answers a deploy, a rollback and a scale: the new release and its plan.
type DeployResponse struct {
	Release Release `json:"release"`
	Plan    Plan    `json:"plan"`
}

// RollbackRequest is POST /v1/apps/{app}/rollback: deploy an earlier release again
// (version 0: the one before the latest that succeeded).
type RollbackRequest struct {
	Version int `json:"version,omitempty"`
}

// ScaleRequest is POST /v1/apps/{app}/scale: the latest release with a group's count
// changed.
type ScaleRequest struct {
	Group string `json:"group,omitempty"` // default "app"
	Count int    `json:"count"`
}

// SecretsRequest is POST /v1/apps/{app}/secrets: set these (one new version).
type SecretsRequest struct {
	Values map[string]string `json:"values"`
}

// SecretRequest is POST /v1/apps/{app}/secrets/{name}, as fly-go sets one secret.
type SecretRequest struct {
	Value string `json:"value"`
}

// Secrets lists an app's secrets by name: values never leave the server.
type Secrets struct {
	Version int      `json:"version"`
	Names   []string `json:"names"`
}
