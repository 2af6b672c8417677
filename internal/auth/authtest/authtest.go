// Package authtest gives tests of code behind authentication a checker and the
// operator's token for it.
package authtest

import "github.com/kilnhq/kiln/internal/auth"

// Key is a fixed key that no server uses.
var Key = auth.Key("kiln test key, never used by a server")

// Operator returns a checker that knows the operator's token under Key (and no issued
// token), and that token.
func Operator() (*auth.Checker, string) {
	return &auth.Checker{Key: Key}, Key.Mint(auth.OperatorID)
}
