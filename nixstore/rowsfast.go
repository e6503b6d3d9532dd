package nixstore

import "strconv"

// fastRow decodes one path line of a rows file written the way WriteRows
// writes it (keys of wireRow, strings without escapes, unsigned integers),
// without reflection: encoding/json costs several microseconds a row, a
// noticeable part of importing a million paths. It reports false for
// anything else (an escape, null, a realisation, an unknown key, white
// space, a malformed line), and the caller decodes the line with
// encoding/json, which then accepts or names the error: fastRow never
// decides that a line is wrong, so both decoders accept exactly the same
// lines.
func fastRow(b []byte, w *wireRow) bool {
	p := fastParser{b: b}
	if !p.byte('{') {
		return false
	}
	if p.peek('}') {
		p.i++
		return p.i == len(p.b)
	}
	for {
		key, ok := p.str()
		if !ok || !p.byte(':') {
			return false
		}
		switch key {
		case "path":
			w.Path, ok = p.str()
		case "nar_hash":
			w.NarHash, ok = p.str()
		case "deriver":
			w.Deriver, ok = p.str()
		case "ca":
			w.CA, ok = p.str()
		case "nar_size":
			var n uint64
			n, ok = p.uint()
			w.NarSize = n
		case "time":
			var n uint64
			n, ok = p.uint()
			w.Time = int64(n)
			ok = ok && n <= 1<<62
		case "ultimate":
			w.Ultimate, ok = p.bool()
		case "refs":
			w.Refs, ok = p.strs()
		case "sigs":
			w.Sigs, ok = p.strs()
		case "outputs":
			w.Outputs, ok = p.strMap()
		default:
			return false
		}
		if !ok {
			return false
		}
		if p.peek('}') {
			p.i++
			return p.i == len(p.b)
		}
		if !p.byte(',') {
			return false
		}
	}
}

type fastParser struct {
	b []byte
	i int
}

func (p *fastParser) peek(c byte) bool { return p.i < len(p.b) && p.b[p.i] == c }

func (p *fastParser) byte(c byte) bool {
	if p.peek(c) {
		p.i++
		return true
	}
	return false
}

// str reads a string without escapes or control characters.
func (p *fastParser) str() (string, bool) {
	if !p.byte('"') {
		return "", false
	}
	start := p.i
	for ; p.i < len(p.b); p.i++ {
		c := p.b[p.i]
		if c == '"' {
			s := string(p.b[start:p.i])
			p.i++
			return s, true
		}
		if c == '\\' || c < 0x20 || c >= 0x80 {
			return "", false
		}
	}
	return "", false
}

func (p *fastParser) uint() (uint64, bool) {
	start := p.i
	for p.i < len(p.b) && p.b[p.i] >= '0' && p.b[p.i] <= '9' {
		p.i++
	}
	if p.i == start || p.i-start > 19 || (p.b[start] == '0' && p.i-start > 1) {
		return 0, false
	}
	n, err := strconv.ParseUint(string(p.b[start:p.i]), 10, 64)
	return n, err == nil
}

func (p *fastParser) bool() (bool, bool) {
	switch {
	case len(p.b)-p.i >= 4 && string(p.b[p.i:p.i+4]) == "true":
		p.i += 4
		return true, true
	case len(p.b)-p.i >= 5 && string(p.b[p.i:p.i+5]) == "false":
		p.i += 5
		return false, true
	}
	return false, false
}

func (p *fastParser) strs() ([]string, bool) {
	if !p.byte('[') {
		return nil, false
	}
	var out []string
	if p.byte(']') {
		return []string{}, true
	}
	for {
		s, ok := p.str()
		if !ok {
			return nil, false
		}
		out = append(out, s)
		if p.byte(']') {
			return out, true
		}
		if !p.byte(',') {
			return nil, false
		}
	}
}

func (p *fastParser) strMap() (map[string]string, bool) {
	if !p.byte('{') {
		return nil, false
	}
	out := map[string]string{}
	if p.byte('}') {
		return out, true
	}
	for {
		k, ok := p.str()
		if !ok || !p.byte(':') {
			return nil, false
		}
		v, ok := p.str()
		if !ok {
			return nil, false
		}
		out[k] = v
		if p.byte('}') {
			return out, true
		}
		if !p.byte(',') {
			return nil, false
		}
	}
}
