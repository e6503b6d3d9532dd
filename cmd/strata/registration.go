package main

import (
	"strings"

	"github.com/strata-nix/strata/nixstore"
)

// parseRegistrationText returns the store paths of a registration.
func parseRegistrationText(reg string) ([]string, error) {
	infos, err := nixstore.ParseRegistration(strings.NewReader(reg))
	if err != nil {
		return nil, err
	}
	out := make([]string, len(infos))
	for i, in := range infos {
		out[i] = in.Path
	}
	return out, nil
}
