package machines

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"time"

	"github.com/kilnhq/kiln/api"
	"github.com/kilnhq/kiln/internal/auth"
	"github.com/kilnhq/kiln/internal/errdefs"
	"github.com/kilnhq/kiln/internal/store"
)

// A lease is an exclusive claim on a machine, as Fly's: while it holds, only the
// holder of its nonce changes the machine. The store compares and swaps it.

// DefaultLeaseTTL is a lease's life when the request names none; MaxLeaseTTL bounds it.
const (
	DefaultLeaseTTL = 30 * time.Second
	MaxLeaseTTL     = time.Hour
)

// Lease returns the lease that holds the machine; ErrNotFound if none holds. Its nonce
// is shown, as Fly shows it: a lease keeps cooperating clients out of each other's way
// (flyctl's `machine leases clear` reads the nonce to let go of a stuck lease); what a
// caller may do at all is its token's business, not the lease's.
func (s *Service) Lease(ctx context.Context, id string) (store.Lease, error) {
	l, err := s.cfg.Store.Lease(ctx, id)
	if err != nil {
		return l, err
	}
	if l.Nonce == "" || !l.ExpiresAt.After(time.Now()) {
		return store.Lease{}, errdefs.New(errdefs.ErrNotFound, "machine %s has no lease", id)
	}
	return l, nil
}

// TakeLease takes the machine's lease for ttl (0: DefaultLeaseTTL), or renews it when
// holder is the current nonce. A lease someone else holds is ErrConflict.
func (s *Service) TakeLease(ctx context.Context, id, holder string, ttl time.Duration, description string) (store.Lease, error) {
	if ttl == 0 {
		ttl = DefaultLeaseTTL
	}
	if err := checkLeaseTTL(ttl); err != nil {
		return store.Lease{}, err
	}
	caller, _ := auth.From(ctx)
	l := store.Lease{Nonce: holder, ExpiresAt: time.Now().Add(ttl), Description: description, Owner: caller.TokenID}
	if cur, err := s.cfg.Store.Lease(ctx, id); err != nil {
		return l, err
	} else if holder == "" || cur.Nonce != holder {
		// A new lease gets a new nonce; a renewal keeps the holder's.
		var b [16]byte
		rand.Read(b[:])
		l.Nonce = hex.EncodeToString(b[:])
	} else if description == "" {
		l.Description = cur.Description
	}
	return l, s.cfg.Store.SetLease(ctx, id, holder, l)
}

// ReleaseLease lets go of the machine's lease; holder must be its nonce.
func (s *Service) ReleaseLease(ctx context.Context, id, holder string) error {
	return s.cfg.Store.SetLease(ctx, id, holder, store.Lease{})
}

// CheckLease refuses a change to the machine unless no lease holds it or nonce is the
// lease's.
func (s *Service) CheckLease(ctx context.Context, id, nonce string) error {
	l, err := s.cfg.Store.Lease(ctx, id)
	if err != nil {
		return err
	}
	if l.Nonce != "" && nonce != l.Nonce {
		return errdefs.New(errdefs.ErrConflict, "machine %s is leased (%s) until %s: send its nonce in the %s header", id, l.Description, l.ExpiresAt.Format(time.RFC3339), api.LeaseHeader)
	}
	return nil
}

// checkLeaseTTL is the one rule for how long a lease may last.
func checkLeaseTTL(ttl time.Duration) error {
	if ttl < time.Second || ttl > MaxLeaseTTL {
		return errdefs.Invalid("ttl=%d: give seconds from 1 to %d", int(ttl/time.Second), int(MaxLeaseTTL/time.Second))
	}
	return nil
}
