package secrets

import (
	"context"
	"errors"
	"maps"
	"slices"

	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

// Apps keeps each app's secrets, sealed with the keyring: every set and unset makes a
// new version, and only a machine's boot reads the values back.
type Apps struct {
	Store   store.Secrets
	Keyring *Keyring
}

// Names lists the names of an app's latest secrets, sorted, with their version.
func (a *Apps) Names(ctx context.Context, app string) ([]string, int, error) {
	vals, v, err := a.values(ctx, app, 0)
	return slices.Sorted(maps.Keys(vals)), v, err
}

// Values are an app's secrets at a version (0: the latest); none for an app without.
func (a *Apps) Values(ctx context.Context, app string, version int) (map[string]string, error) {
	vals, _, err := a.values(ctx, app, version)
	return vals, err
}

func (a *Apps) values(ctx context.Context, app string, version int) (map[string]string, int, error) {
	sv, err := a.Store.SecretsAt(ctx, app, version)
	if err != nil || sv.Version == 0 {
		return map[string]string{}, 0, err
	}
	vals, err := a.Keyring.Open(app, sv.Version, sv.Sealed)
	if err != nil {
		return nil, 0, errdefs.Wrap(errdefs.ErrUnavailable, err, "secrets of app %s, version %d, do not open with this server's key (is --secrets-key the file the other hosts use?)", app, sv.Version)
	}
	return vals, sv.Version, nil
}

// Change sets (a value) and unsets (nil) secrets as one new version, and returns it.
// Two changes at once do not lose either: the second is made again on the first.
func (a *Apps) Change(ctx context.Context, app string, set map[string]string, unset []string) (int, error) {
	for k := range set {
		if err := CheckName(k); err != nil {
			return 0, err
		}
	}
	for attempt := 0; ; attempt++ {
		vals, v, err := a.values(ctx, app, 0)
		if err != nil {
			return 0, err
		}
		for _, k := range unset {
			if _, ok := vals[k]; !ok {
				return 0, errdefs.New(errdefs.ErrNotFound, "app %s has no secret %s (kiln secrets ls lists them)", app, k)
			}
			delete(vals, k)
		}
		maps.Copy(vals, set)
		if err := Check(vals); err != nil {
			return 0, err
		}
		sealed, err := a.Keyring.Seal(app, v+1, vals)
		if err != nil {
			return 0, err
		}
		next, err := a.Store.PutSecrets(ctx, app, v, sealed)
		if errors.Is(err, errdefs.ErrConflict) && attempt < 5 {
			continue
		}
		return next, err
	}
}
