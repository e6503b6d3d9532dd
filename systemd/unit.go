// Package systemd holds strata's systemd units (strata-server.service,
// strata-builder.service), its tmpfiles.d and modules-load.d files: the one
// source the Ansible roles install and the NixOS module mirrors. Parse reads
// a unit into its directives so tests can compare renderings of it.
package systemd

import (
	"bufio"
	"embed"
	"fmt"
	"strings"
)

// Files are the shipped unit, tmpfiles.d and modules-load.d files.
//
//go:embed strata-server.service strata-builder.service strata.tmpfiles strata-modules.conf
var Files embed.FS

// Unit is a parsed unit file: section -> key -> values in file order
// (a key may repeat, e.g. Environment=).
type Unit map[string]map[string][]string

// Get returns the values of section.key, nil if unset.
func (u Unit) Get(section, key string) []string { return u[section][key] }

// Parse reads a unit file (comments, blank lines, [Section], Key=Value;
// no line continuations, which strata's units do not use).
func Parse(text string) (Unit, error) {
	u := Unit{}
	section := ""
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = line[1 : len(line)-1]
			if u[section] == nil {
				u[section] = map[string][]string{}
			}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" || strings.HasSuffix(line, "\\") {
				return nil, fmt.Errorf("unit line %d: %q: want Key=Value inside a [Section]", n, line)
			}
			k = strings.TrimSpace(k)
			u[section][k] = append(u[section][k], strings.TrimSpace(v))
		}
	}
	return u, sc.Err()
}

// Load parses one of Files by name.
func Load(name string) (Unit, error) {
	b, err := Files.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("load unit %s: %w", name, err)
	}
	u, err := Parse(string(b))
	if err != nil {
		return nil, fmt.Errorf("load unit %s: %w", name, err)
	}
	return u, nil
}
