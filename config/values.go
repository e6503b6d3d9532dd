package config

import (
	"errors"
	"fmt"
	"net"
	"reflect"
	"strconv"
)

// HostPort splits an address key's value host:port. The port must be a
// number 0-65535: a service name or a typo such as ":2049x" is refused
// here, at config load, rather than by the listen or dial at start. host
// may be empty (every address, for a listen key).
func HostPort(s string) (host string, port int, err error) {
	h, p, err := net.SplitHostPort(s)
	if err != nil {
		return "", 0, err
	}
	n, err := strconv.Atoi(p)
	if err != nil || n < 0 || n > 65535 || strconv.Itoa(n) != p {
		return "", 0, fmt.Errorf("port %q: want a number 0-65535", p)
	}
	return h, n, nil
}

// Changed names the configuration keys whose values differ between a and
// b, two values of the same struct type whose fields carry the key they
// come from in a `key:"section.name"` tag. A field tagged `key:"-"` is
// derived from other keys and not compared; an untagged struct field is
// compared field by field. It panics on an untagged field of another
// kind, so that a new field cannot be forgotten (see Tags).
func Changed(a, b any) []string {
	var out []string
	walk(reflect.ValueOf(a), reflect.ValueOf(b), func(key string, x, y reflect.Value) {
		if !reflect.DeepEqual(x.Interface(), y.Interface()) {
			out = append(out, key)
		}
	})
	return out
}

// Tags returns the keys a struct's tags name (see Changed), or an error
// naming a field that has no tag.
func Tags(v any) (keys []string, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	rv := reflect.ValueOf(v)
	walk(rv, rv, func(key string, _, _ reflect.Value) { keys = append(keys, key) })
	return keys, nil
}

// CheckTags reports whether a daemon's config struct and its key table
// agree: every field names a key (Tags) and every key has its field, so a
// reload logs keys and no key is read into nothing. The error names what
// differs.
func CheckTags(v any, keys []Key) error {
	tags, err := Tags(v)
	if err != nil {
		return err
	}
	have := map[string]bool{}
	for _, t := range tags {
		have[t] = true
	}
	var untagged, unknown []string
	names := map[string]bool{}
	for _, k := range keys {
		names[k.Name] = true
		if !have[k.Name] {
			untagged = append(untagged, k.Name)
		}
	}
	for _, t := range tags {
		if !names[t] {
			unknown = append(unknown, t)
		}
	}
	if len(untagged)+len(unknown) > 0 {
		return fmt.Errorf("config tags: keys without a field %v, field tags that are no key %v", untagged, unknown)
	}
	return nil
}

func walk(a, b reflect.Value, f func(key string, x, y reflect.Value)) {
	t := a.Type()
	for i := range t.NumField() {
		sf := t.Field(i)
		key, ok := sf.Tag.Lookup("key")
		switch {
		case key == "-":
		case ok:
			f(key, a.Field(i), b.Field(i))
		case sf.Type.Kind() == reflect.Struct && sf.IsExported():
			walk(a.Field(i), b.Field(i), f)
		default:
			panic(errors.New("config: field " + t.Name() + "." + sf.Name + " has no key tag"))
		}
	}
}
