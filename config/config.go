// Package config loads a daemon's settings from a YAML file, STRATA_*
// environment variables and command-line flags, in rising order of
// precedence, against a fixed table of keys.
//
// Every key "section.name" is also the environment variable
// STRATA_SECTION_NAME and the flag --section-name. Unknown keys in the file,
// values of the wrong type and missing required keys are errors that name
// the key, the value and what was expected; nothing is started on error.
package config

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cast"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
)

// Kind is the type of a key's value.
type Kind int

const (
	String Kind = iota
	Int
	Duration
	Bool
	List
)

// String names the kind the way error messages describe expected values.
func (k Kind) String() string {
	switch k {
	case String:
		return "a string"
	case Int:
		return "an integer"
	case Duration:
		return "a duration such as 30s or 5m"
	case Bool:
		return "true or false"
	case List:
		return "a list of strings"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// Key describes one setting.
type Key struct {
	Name     string // dotted, lowercase: "nfs.listen"
	Kind     Kind
	Default  any // nil: no default
	Usage    string
	Required bool
}

// EnvName is the environment variable that sets the key.
func (k Key) EnvName() string {
	return "STRATA_" + strings.ToUpper(strings.NewReplacer(".", "_", "-", "_").Replace(k.Name))
}

// FlagName is the command-line flag that sets the key.
func (k Key) FlagName() string { return strings.NewReplacer(".", "-", "_", "-").Replace(k.Name) }

// Loader reads settings for one table of keys.
type Loader struct {
	keys  []Key
	flags *pflag.FlagSet
}

// New returns a loader for keys.
func New(keys []Key) *Loader { return &Loader{keys: keys} }

// Keys returns the table, sorted by name.
func (l *Loader) Keys() []Key {
	ks := append([]Key(nil), l.keys...)
	sort.Slice(ks, func(i, j int) bool { return ks[i].Name < ks[j].Name })
	return ks
}

// BindFlags defines one flag per key on fs. Only flags the user sets
// override the file and environment.
func (l *Loader) BindFlags(fs *pflag.FlagSet) {
	l.flags = fs
	for _, k := range l.keys {
		usage := fmt.Sprintf("%s (env %s)", k.Usage, k.EnvName())
		switch k.Kind {
		case List:
			fs.StringSlice(k.FlagName(), nil, usage)
		case Bool:
			// --name alone means true, as for any boolean flag;
			// --name=false turns it off.
			fs.Var(&flagValue{kind: k.Kind}, k.FlagName(), usage+" [--"+k.FlagName()+"=false to turn off]")
			fs.Lookup(k.FlagName()).NoOptDefVal = "true"
		default:
			fs.Var(&flagValue{kind: k.Kind}, k.FlagName(), usage)
		}
	}
}

// flagValue holds a flag's text as given; Load converts it with the
// key's kind, like a value from the file or the environment. Its Type
// names the kind in --help.
type flagValue struct {
	kind Kind
	s    string
}

func (f *flagValue) String() string     { return f.s }
func (f *flagValue) Set(s string) error { f.s = s; return nil }
func (f *flagValue) Type() string {
	switch f.kind {
	case Int:
		return "int"
	case Duration:
		return "duration"
	case Bool:
		return "bool"
	}
	return "string"
}

// Values are loaded settings.
type Values struct {
	m map[string]any
	// Source says where each key's value came from: "default", "file",
	// "env" or "flag".
	Source map[string]string
}

// Load reads file (a missing file is an error only when mustExist), then
// the environment, then flags set on the bound flag set.
func (l *Loader) Load(file string, mustExist bool) (Values, error) {
	known := map[string]Key{}
	for _, k := range l.keys {
		known[k.Name] = k
	}
	raw := map[string]any{}
	src := map[string]string{}
	for _, k := range l.keys {
		if k.Default != nil {
			raw[k.Name], src[k.Name] = k.Default, "default"
		}
	}

	if file != "" {
		v := viper.New()
		v.SetConfigFile(file)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			var nf viper.ConfigFileNotFoundError
			if errors.As(err, &nf) || errors.Is(err, os.ErrNotExist) {
				if mustExist {
					return Values{}, fmt.Errorf("config %s: %w", file, os.ErrNotExist)
				}
			} else {
				return Values{}, fmt.Errorf("config %s: %w", file, err)
			}
		} else {
			var unknown []string
			for _, name := range v.AllKeys() {
				if _, ok := known[name]; !ok {
					// viper flattens maps: "nfs.allow.a" is a map given
					// where nfs.allow wants another kind.
					for parent := name; strings.Contains(parent, "."); {
						parent = parent[:strings.LastIndex(parent, ".")]
						if k, ok := known[parent]; ok {
							return Values{}, fmt.Errorf("config %s: key %q: value is a mapping: want %s", file, parent, k.Kind)
						}
					}
					unknown = append(unknown, name)
					continue
				}
				raw[name], src[name] = v.Get(name), "file"
			}
			if len(unknown) > 0 {
				sort.Strings(unknown)
				return Values{}, fmt.Errorf("config %s: unknown key %q%s (known keys: %s)", file, unknown[0], l.suggest(unknown[0]), strings.Join(names(l.Keys()), ", "))
			}
		}
	}

	for _, k := range l.keys {
		if s, ok := os.LookupEnv(k.EnvName()); ok {
			if k.Kind == List {
				raw[k.Name] = splitList(s)
			} else {
				raw[k.Name] = s
			}
			src[k.Name] = "env " + k.EnvName()
		}
	}

	if l.flags != nil {
		for _, k := range l.keys {
			f := l.flags.Lookup(k.FlagName())
			if f == nil || !f.Changed {
				continue
			}
			if k.Kind == List {
				raw[k.Name], _ = l.flags.GetStringSlice(k.FlagName())
			} else {
				raw[k.Name] = f.Value.String()
			}
			src[k.Name] = "flag --" + k.FlagName()
		}
	}

	out := Values{m: map[string]any{}, Source: src}
	for _, k := range l.keys {
		r, ok := raw[k.Name]
		if !ok || r == nil {
			if k.Required {
				return Values{}, fmt.Errorf("config: missing required key %q (%s; set it in the file, %s or --%s)", k.Name, k.Usage, k.EnvName(), k.FlagName())
			}
			continue
		}
		val, err := convert(k, r)
		if err != nil {
			return Values{}, fmt.Errorf("config: key %q (from %s): value %v: want %s", k.Name, src[k.Name], quote(r), k.Kind)
		}
		if k.Required && isZero(val) {
			return Values{}, fmt.Errorf("config: missing required key %q (%s): it is empty", k.Name, k.Usage)
		}
		out.m[k.Name] = val
	}
	return out, nil
}

func convert(k Key, r any) (any, error) {
	switch k.Kind {
	case String:
		switch r.(type) {
		case map[string]any, []any:
			return nil, errors.New("not a string")
		}
		return cast.ToStringE(r)
	case Int:
		if f, ok := r.(float64); ok && f != float64(int(f)) {
			return nil, errors.New("not an integer")
		}
		if s, ok := r.(string); ok {
			var n int
			if _, err := fmt.Sscanf(strings.TrimSpace(s), "%d", &n); err != nil || fmt.Sprint(n) != strings.TrimSpace(s) {
				return nil, errors.New("not an integer")
			}
			return n, nil
		}
		return cast.ToIntE(r)
	case Duration:
		if s, ok := r.(string); ok {
			return time.ParseDuration(strings.TrimSpace(s))
		}
		if d, ok := r.(time.Duration); ok {
			return d, nil
		}
		return nil, errors.New("not a duration")
	case Bool:
		if s, ok := r.(string); ok {
			switch strings.ToLower(strings.TrimSpace(s)) {
			case "true", "yes", "1", "on":
				return true, nil
			case "false", "no", "0", "off":
				return false, nil
			}
			return nil, errors.New("not a bool")
		}
		return cast.ToBoolE(r)
	case List:
		switch v := r.(type) {
		case []string:
			return v, nil
		case []any:
			out := make([]string, 0, len(v))
			for _, e := range v {
				switch e.(type) {
				case map[string]any, []any:
					return nil, errors.New("not a string list")
				}
				out = append(out, fmt.Sprint(e))
			}
			return out, nil
		case string:
			return splitList(v), nil
		}
		return nil, errors.New("not a list")
	}
	return nil, fmt.Errorf("unknown kind %v", k.Kind)
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func isZero(v any) bool {
	switch x := v.(type) {
	case string:
		return x == ""
	case []string:
		return len(x) == 0
	}
	return false
}

func quote(r any) string {
	if s, ok := r.(string); ok {
		return fmt.Sprintf("%q", s)
	}
	return fmt.Sprintf("%v", r)
}

// suggest returns ": did you mean K?" for the known key K closest to the
// unknown name (a typo, a dash for an underscore, a key put in the wrong
// section, a key cut short), or "" when no key is close enough to be a likely meaning.
func (l *Loader) suggest(name string) string {
	best, bestD := "", -1
	for _, k := range l.keys {
		d := editDistance(name, k.Name)
		if i := strings.LastIndex(name, "."); i >= 0 && strings.HasSuffix(k.Name, name[i:]) {
			d = min(d, 2) // the right key in the wrong section
		}
		if strings.HasPrefix(k.Name, name+"_") {
			d = min(d, 1) // "api.token" for api.token_file
		}
		if bestD < 0 || d < bestD || (d == bestD && k.Name < best) {
			best, bestD = k.Name, d
		}
	}
	if best == "" || bestD > max(2, len(name)/3) {
		return ""
	}
	return fmt.Sprintf(": did you mean %q?", best)
}

func names(ks []Key) []string {
	out := make([]string, len(ks))
	for i, k := range ks {
		out[i] = k.Name
	}
	return out
}

// From names where key's value came from, for an error about it:
// " (from file)", " (from env STRATA_…)" or " (from flag --…)"; "" for a
// default or an unset key. An operator whose file looks right learns that
// a variable or a flag set the value.
func (v Values) From(key string) string {
	switch src := v.Source[key]; src {
	case "", "default":
		return ""
	default:
		return " (from " + src + ")"
	}
}

// Bad is the error for key's value val, loaded but not valid: it names the
// key, where the value came from (From), the value and what is wanted.
func (v Values) Bad(key string, val any, want string) error {
	return fmt.Errorf("config: key %q%s: value %q: want %s", key, v.From(key), fmt.Sprint(val), want)
}

// NotDir is the error for a directory key whose path exists and is not a
// directory, or lies under a file: later steps would fail with errors that
// do not name the key ("open .../generations: not a directory"). A path
// that does not exist is not an error (a start makes it).
func (v Values) NotDir(key, path string) error {
	fi, err := os.Stat(path)
	switch {
	case err == nil && !fi.IsDir():
		return v.Bad(key, path, "a directory: it exists and is not a directory (a start makes one where nothing is)")
	case errors.Is(err, syscall.ENOTDIR):
		return v.Bad(key, path, "a directory: a path component above it is not a directory")
	}
	return nil
}

// Invalid is Bad with the check's own error in place of what is wanted.
func (v Values) Invalid(key string, val any, err error) error {
	return fmt.Errorf("config: key %q%s: value %q: %w", key, v.From(key), fmt.Sprint(val), err)
}

// String returns a string key's value ("" when unset).
func (v Values) String(name string) string { s, _ := v.m[name].(string); return s }

// Int returns an integer key's value.
func (v Values) Int(name string) int { n, _ := v.m[name].(int); return n }

// Duration returns a duration key's value.
func (v Values) Duration(name string) time.Duration { d, _ := v.m[name].(time.Duration); return d }

// Bool returns a boolean key's value.
func (v Values) Bool(name string) bool { b, _ := v.m[name].(bool); return b }

// List returns a list key's value.
func (v Values) List(name string) []string { l, _ := v.m[name].([]string); return l }
