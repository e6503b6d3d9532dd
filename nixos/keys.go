// Package nixos holds the NixOS module (module.nix) and its evaluation
// tests. keys.json, which the module builds its typed settings options
// from, is generated from the daemons' key tables by KeysJSON; a test keeps
// it current (go test ./nixos/ -run TestKeysJSONUpToDate -update).
package nixos

import (
	"encoding/json"
	"fmt"

	"github.com/strata-nix/strata/builder"
	"github.com/strata-nix/strata/config"
	"github.com/strata-nix/strata/server"
)

// key is one configuration key as module.nix reads it.
type key struct {
	Name    string `json:"name"`
	Kind    string `json:"kind"` // string, int, duration, bool, list
	Default any    `json:"default"`
	Usage   string `json:"usage"`
}

func kindName(k config.Kind) string {
	switch k {
	case config.String:
		return "string"
	case config.Int:
		return "int"
	case config.Duration:
		return "duration"
	case config.Bool:
		return "bool"
	case config.List:
		return "list"
	}
	panic(fmt.Sprintf("config kind %d has no NixOS type", int(k)))
}

func keysOf(ks []config.Key) []key {
	out := make([]key, 0, len(ks))
	for _, k := range ks {
		out = append(out, key{Name: k.Name, Kind: kindName(k.Kind), Default: k.Default, Usage: k.Usage})
	}
	return out
}

// KeysJSON renders both daemons' key tables as keys.json.
func KeysJSON() ([]byte, error) {
	b, err := json.MarshalIndent(map[string][]key{"server": keysOf(server.Keys), "builder": keysOf(builder.Keys)}, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}
