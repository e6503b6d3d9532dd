package config

import (
	"fmt"
	"sort"
	"strings"
)

// EnvPrefix starts every environment variable strata reads.
const EnvPrefix = "STRATA_"

// CheckEnv refuses a mistyped variable the way Load refuses an unknown key
// in the file: it returns an error naming the first variable of environ
// ("NAME=value" entries, as os.Environ) that starts with EnvPrefix and is
// not in known, and the known name closest to it. known maps every
// accepted name to what it is ("key api.token_file"), shown with the
// closest name.
func CheckEnv(environ []string, known map[string]string) error {
	var unknown []string
	for _, e := range environ {
		name, _, _ := strings.Cut(e, "=")
		if !strings.HasPrefix(name, EnvPrefix) {
			continue
		}
		if _, ok := known[name]; !ok {
			unknown = append(unknown, name)
		}
	}
	if len(unknown) == 0 {
		return nil
	}
	sort.Strings(unknown)
	name := unknown[0]
	best, bestD := "", -1
	for k := range known {
		d := editDistance(name, k)
		if bestD < 0 || d < bestD || (d == bestD && k < best) {
			best, bestD = k, d
		}
	}
	more := ""
	if len(unknown) > 1 {
		more = fmt.Sprintf(" (and %d more: %s)", len(unknown)-1, strings.Join(unknown[1:], ", "))
	}
	if best == "" {
		return fmt.Errorf("config: unknown environment variable %s%s: strata reads no such variable; unset it", name, more)
	}
	return fmt.Errorf("config: unknown environment variable %s%s: did you mean %s (%s)? strata reads no such variable; fix or unset it",
		name, more, best, known[best])
}

// editDistance is the optimal-string-alignment distance between a and b
// (bytes): insertions, deletions, substitutions and swaps of two adjacent
// letters ("TOKNE" for "TOKEN") count one each.
func editDistance(a, b string) int {
	rows := [3][]int{make([]int, len(b)+1), make([]int, len(b)+1), make([]int, len(b)+1)}
	for j := range rows[1] {
		rows[1][j] = j
	}
	for i := 1; i <= len(a); i++ {
		pp, prev, cur := rows[0], rows[1], rows[2]
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], pp[j-2]+1)
			}
		}
		rows[0], rows[1], rows[2] = prev, cur, pp
	}
	return rows[1][len(b)]
}
