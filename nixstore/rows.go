package nixstore

import (
	"bufio"
	"bytes"
	stdgzip "compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"path"
	"slices"
	"strings"

	"github.com/klauspost/compress/gzip"
)

// Row is one valid store path as Nix's own database holds it: the
// registration fields (PathInfo) and what the dump-db text leaves out.
type Row struct {
	PathInfo
	// RegistrationTime is ValidPaths.registrationTime (Unix seconds).
	RegistrationTime int64
	// Ultimate is ValidPaths.ultimate: the path was built on that store.
	Ultimate bool
	// Sigs are the path's signatures ("keyname:base64"), in the order of
	// the space-separated ValidPaths.sigs.
	Sigs []string
	// CA is ValidPaths.ca: the content-address assertion ("fixed:…",
	// "text:…"), or "".
	CA string
	// Outputs are the DerivationOutputs rows of a .drv path: output name
	// to output path. Floating content-addressed outputs have none.
	Outputs map[string]string
}

// Realisation is one row of the Realisations table (content-addressed
// derivations, experimental in Nix): which path a derivation output
// resolved to, with its signatures and the realisations it depends on.
type Realisation struct {
	// DrvHash is Realisations.drvPath, which holds the derivation's hash
	// modulo ("sha256:…"), not a store path.
	DrvHash string
	// OutputName is the output's symbolic name, usually "out".
	OutputName string
	// OutPath is the store path the output resolved to.
	OutPath string
	// Sigs are Realisations.signatures, split on spaces.
	Sigs []string
	// Refs are the IDs (see ID) of the realisations this one depends on
	// (RealisationsRefs), sorted.
	Refs []string
}

// ID is the realisation's DrvOutput id as Nix prints it: "<drv hash>!<output>".
func (r Realisation) ID() string { return r.DrvHash + "!" + r.OutputName }

// Rows is everything a Nix database holds about its valid paths.
type Rows struct {
	// Paths are sorted by path.
	Paths []Row
	// Realisations are sorted by ID.
	Realisations []Realisation
}

// Infos returns the registration records of rows (sharing References).
func (rs *Rows) Infos() []PathInfo {
	out := make([]PathInfo, len(rs.Paths))
	for i := range rs.Paths {
		out[i] = rs.Paths[i].PathInfo
	}
	return out
}

// RowsFromInfos makes rows of registration records (no signatures, CA,
// outputs or realisations): what a builder has when only the registration
// text is available.
func RowsFromInfos(infos []PathInfo) *Rows {
	rs := &Rows{Paths: make([]Row, len(infos))}
	for i := range infos {
		rs.Paths[i].PathInfo = infos[i]
	}
	return rs
}

// Rows file format (this package writes and reads it; the server serves it
// as GET /v1/generations/N/paths).
//
// A gzip stream of JSON lines. The first line is a RowsHeader naming the
// format and its version; then one line per path, sorted by path; then one
// line per realisation, sorted by id. JSON lines because the file streams
// (a reader never needs more than one line in hand to check it), a delta is
// the same format filtered, any language reads it, and gzip takes most of
// the repetition (store dir prefixes, keys) out of it. A reader refuses a
// version it does not know, a truncated stream (gzip's length and CRC
// trailer, and the header's counts) and any malformed line, naming it.
const (
	RowsFormat  = "strata-rows"
	RowsVersion = 1
)

// RowsHeader is the first line of a rows file.
type RowsHeader struct {
	Format  string `json:"format"`
	Version int    `json:"version"`
	// StoreDir is the store directory every path is in.
	StoreDir string `json:"store_dir"`
	// Generation is the generation the rows describe.
	Generation uint64 `json:"generation"`
	// From is set on a delta: only rows of Generation that are not in
	// generation From (or changed since) follow.
	From uint64 `json:"from,omitempty"`
	// Paths and Realisations count the lines that follow.
	Paths        int `json:"paths"`
	Realisations int `json:"realisations"`
}

// wireRow is one line after the header: a path, or a realisation.
type wireRow struct {
	Path        string            `json:"path,omitempty"`
	NarHash     string            `json:"nar_hash,omitempty"`
	NarSize     uint64            `json:"nar_size,omitempty"`
	Deriver     string            `json:"deriver,omitempty"`
	Refs        []string          `json:"refs,omitempty"`
	Time        int64             `json:"time,omitempty"`
	Ultimate    bool              `json:"ultimate,omitempty"`
	Sigs        []string          `json:"sigs,omitempty"`
	CA          string            `json:"ca,omitempty"`
	Outputs     map[string]string `json:"outputs,omitempty"`
	Realisation *wireRealisation  `json:"realisation,omitempty"`
}

type wireRealisation struct {
	DrvHash string   `json:"drv_hash"`
	Output  string   `json:"output"`
	OutPath string   `json:"out_path"`
	Sigs    []string `json:"sigs,omitempty"`
	Refs    []string `json:"refs,omitempty"`
}

// WriteRows writes rs as a rows file with header h (its format, version and
// counts are filled in). rs must be sorted (see SortRows) and pass
// CheckRows.
func WriteRows(w io.Writer, h RowsHeader, rs *Rows) error {
	h.Format, h.Version = RowsFormat, RowsVersion
	h.Paths, h.Realisations = len(rs.Paths), len(rs.Realisations)
	if err := CheckRows(h.StoreDir, rs); err != nil {
		return fmt.Errorf("write rows: %w", err)
	}
	// The standard library's deflate compresses these lines a little
	// tighter (about 2%) than klauspost's at the default level; reading
	// uses klauspost's inflate, twice as fast.
	zw, err := stdgzip.NewWriterLevel(w, stdgzip.DefaultCompression)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(zw, 64<<10)
	enc := json.NewEncoder(bw)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(h); err != nil {
		return fmt.Errorf("write rows: %w", err)
	}
	for i := range rs.Paths {
		r := &rs.Paths[i]
		if err := enc.Encode(wireRow{Path: r.Path, NarHash: r.NarHash, NarSize: r.NarSize, Deriver: r.Deriver,
			Refs: r.References, Time: r.RegistrationTime, Ultimate: r.Ultimate, Sigs: r.Sigs, CA: r.CA,
			Outputs: r.Outputs}); err != nil {
			return fmt.Errorf("write rows: %w", err)
		}
	}
	for _, r := range rs.Realisations {
		if err := enc.Encode(wireRow{Realisation: &wireRealisation{DrvHash: r.DrvHash, Output: r.OutputName,
			OutPath: r.OutPath, Sigs: r.Sigs, Refs: r.Refs}}); err != nil {
			return fmt.Errorf("write rows: %w", err)
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write rows: %w", err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("write rows: %w", err)
	}
	return nil
}

// ErrRowsVersion is returned for a rows file of another format or version.
var ErrRowsVersion = errors.New("unsupported rows format")

// ReadRows reads a rows file. Everything is checked before anything is
// returned: the header's format and version, every line (store paths in the
// header's store dir, NAR hashes, sorted unique paths, sorted references),
// the counts and the gzip trailer. An error names the line.
func ReadRows(r io.Reader) (RowsHeader, *Rows, error) {
	h, rs, err := readRows(r)
	if err != nil {
		return RowsHeader{}, nil, fmt.Errorf("read rows: %w", err)
	}
	return h, rs, nil
}

func readRows(r io.Reader) (RowsHeader, *Rows, error) {
	var h RowsHeader
	zr, err := gzip.NewReader(r)
	if err != nil {
		return h, nil, fmt.Errorf("not a gzip stream: %w", err)
	}
	zr.Multistream(false)
	// Inflating takes about as long as parsing: one goroutine inflates
	// into chunks of whole lines while this one parses.
	lr := newLineReader(zr)
	defer lr.close()
	nextLine := lr.next
	b, err := nextLine()
	if err != nil {
		if errors.Is(err, io.EOF) {
			return h, nil, errors.New("line 1: empty: no header line")
		}
		return h, nil, fmt.Errorf("line 1: header: %w", err)
	}
	if err := strictUnmarshal(b, &h); err != nil {
		return h, nil, fmt.Errorf("line 1: header: %w", err)
	}
	if h.Format != RowsFormat || h.Version != RowsVersion {
		return h, nil, fmt.Errorf("line 1: format %q version %d: %w (this strata reads %s version %d)",
			h.Format, h.Version, ErrRowsVersion, RowsFormat, RowsVersion)
	}
	if h.Paths < 0 || h.Realisations < 0 {
		return h, nil, fmt.Errorf("line 1: negative counts")
	}
	if err := checkStoreDir(h.StoreDir+"/x", h.StoreDir); err != nil {
		return h, nil, fmt.Errorf("line 1: store_dir: %w", err)
	}
	rs := &Rows{Paths: make([]Row, 0, min(h.Paths, 1<<20)), Realisations: make([]Realisation, 0, min(h.Realisations, 1<<16))}
	for line := 2; ; line++ {
		b, err := nextLine()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return h, nil, fmt.Errorf("line %d: %w", line, err)
		}
		var w wireRow
		// The fast decoder takes the lines WriteRows writes; anything
		// else goes through encoding/json, which accepts it or names
		// the error.
		if !fastRow(b, &w) {
			w = wireRow{}
			if err := strictUnmarshal(b, &w); err != nil {
				return h, nil, fmt.Errorf("line %d: %w", line, err)
			}
		}
		if w.Realisation != nil {
			if w.Path != "" || w.NarHash != "" || w.NarSize != 0 || w.Deriver != "" || len(w.Refs) > 0 || w.Time != 0 ||
				w.Ultimate || len(w.Sigs) > 0 || w.CA != "" || len(w.Outputs) > 0 {
				return h, nil, fmt.Errorf("line %d: a realisation line has path fields", line)
			}
			x := w.Realisation
			rs.Realisations = append(rs.Realisations, Realisation{DrvHash: x.DrvHash, OutputName: x.Output,
				OutPath: x.OutPath, Sigs: x.Sigs, Refs: x.Refs})
			if len(rs.Realisations) > h.Realisations {
				return h, nil, fmt.Errorf("line %d: more realisations than the header's %d", line, h.Realisations)
			}
			continue
		}
		if len(rs.Realisations) > 0 {
			return h, nil, fmt.Errorf("line %d: path %s after the realisations", line, clip(w.Path))
		}
		rs.Paths = append(rs.Paths, Row{PathInfo: PathInfo{Path: w.Path, NarHash: w.NarHash, NarSize: w.NarSize,
			Deriver: w.Deriver, References: w.Refs}, RegistrationTime: w.Time, Ultimate: w.Ultimate, Sigs: w.Sigs,
			CA: w.CA, Outputs: w.Outputs})
		if len(rs.Paths) > h.Paths {
			return h, nil, fmt.Errorf("line %d: more paths than the header's %d", line, h.Paths)
		}
	}
	if len(rs.Paths) != h.Paths || len(rs.Realisations) != h.Realisations {
		return h, nil, fmt.Errorf("truncated: %d paths and %d realisations, header says %d and %d",
			len(rs.Paths), len(rs.Realisations), h.Paths, h.Realisations)
	}
	if err := CheckRows(h.StoreDir, rs); err != nil {
		return h, nil, err
	}
	return h, rs, nil
}

// lineReader splits a stream into lines, reading it ahead in another
// goroutine in chunks that end at a line's end.
type lineReader struct {
	chunks chan chunk
	free   chan []byte
	done   chan struct{}
	exited chan struct{}
	cur    []byte
	held   []byte // the chunk buffer cur points into
	err    error
}

// chunk is whole lines, or the reason there are no more (io.EOF at the
// end, io.ErrUnexpectedEOF when the stream ends inside a line).
type chunk struct {
	b   []byte
	err error
}

const chunkSize = 1 << 20

func newLineReader(r io.Reader) *lineReader {
	l := &lineReader{chunks: make(chan chunk, 2), free: make(chan []byte, 4), done: make(chan struct{}), exited: make(chan struct{})}
	for range 3 {
		l.free <- make([]byte, chunkSize)
	}
	go l.fill(r)
	return l
}

// fill runs in its own goroutine until the stream ends or close.
func (l *lineReader) fill(r io.Reader) {
	defer close(l.exited)
	send := func(c chunk) bool {
		select {
		case l.chunks <- c:
			return true
		case <-l.done:
			return false
		}
	}
	var rest []byte // a line begun in the previous chunk
	for {
		var buf []byte
		select {
		case buf = <-l.free:
		case <-l.done:
			return
		}
		buf = buf[:cap(buf)]
		n := copy(buf, rest)
		for len(rest) > len(buf)/2 || n == len(buf) {
			// A line longer than half a chunk: a bigger buffer.
			buf = append(buf[:n], make([]byte, len(buf))...)
			buf = buf[:cap(buf)]
		}
		var err error
		for n < len(buf) && err == nil {
			var m int
			m, err = r.Read(buf[n:])
			n += m
		}
		end := bytes.LastIndexByte(buf[:n], '\n') + 1
		rest = append(rest[:0], buf[end:n]...)
		if end > 0 && !send(chunk{b: buf[:end]}) {
			return
		}
		if end == 0 {
			l.free <- buf // nothing in it: give it back
		}
		if err != nil {
			if errors.Is(err, io.EOF) && len(rest) > 0 {
				err = io.ErrUnexpectedEOF // no final newline
			}
			send(chunk{err: err})
			return
		}
	}
}

// next returns the next line without its newline; io.EOF after the last.
// The line is valid until the next call.
func (l *lineReader) next() ([]byte, error) {
	for len(l.cur) == 0 {
		if l.err != nil {
			return nil, l.err
		}
		if l.held != nil {
			l.free <- l.held[:cap(l.held)]
			l.held = nil
		}
		c := <-l.chunks
		if c.err != nil {
			l.err = c.err
			continue
		}
		l.cur, l.held = c.b, c.b
	}
	i := bytes.IndexByte(l.cur, '\n')
	line := l.cur[:i]
	l.cur = l.cur[i+1:]
	return line, nil
}

// close stops the reading goroutine and waits for it.
func (l *lineReader) close() {
	close(l.done)
	<-l.exited
}

func strictUnmarshal(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return err
	}
	if d.More() {
		return errors.New("more than one JSON value on the line")
	}
	return nil
}

// CheckRows reports the first row that is not well formed for store dir
// dir: the registration checks of CheckInfos (every path in dir),
// paths sorted and unique, signatures and CA without spaces or newlines,
// output names and paths, and realisations sorted, unique and pointing
// at store paths.
func CheckRows(dir string, rs *Rows) error {
	if err := checkStoreDir(dir+"/x", dir); err != nil {
		return fmt.Errorf("store dir: %w", err)
	}
	for i := range rs.Paths {
		r := &rs.Paths[i]
		if err := checkStorePath(r.Path, dir); err != nil {
			return fmt.Errorf("path %d: %w", i+1, err)
		}
		if i > 0 && rs.Paths[i-1].Path >= r.Path {
			return fmt.Errorf("path %s: paths not sorted or repeated", r.Path)
		}
		// What CheckInfos checks of a registration record (uniqueness
		// follows from the order).
		if !isBase16SHA256(r.NarHash) {
			return fmt.Errorf("path %s: NAR hash %q is not 64 lowercase hex digits", r.Path, clip(r.NarHash))
		}
		if r.Deriver != "" {
			if err := checkStorePath(r.Deriver, dir); err != nil {
				return fmt.Errorf("path %s: deriver: %w", r.Path, err)
			}
		}
		for j, ref := range r.References {
			if err := checkStorePath(ref, dir); err != nil {
				return fmt.Errorf("path %s: reference: %w", r.Path, err)
			}
			if j > 0 && r.References[j-1] >= ref {
				return fmt.Errorf("path %s: references not sorted or repeated at %s", r.Path, ref)
			}
		}
		for _, s := range r.Sigs {
			if s == "" || strings.ContainsAny(s, " \t\n") {
				return fmt.Errorf("path %s: signature %q is empty or has white space", r.Path, clip(s))
			}
		}
		if strings.ContainsAny(r.CA, "\n") {
			return fmt.Errorf("path %s: ca %q has a newline", r.Path, clip(r.CA))
		}
		for _, name := range slices.Sorted(maps.Keys(r.Outputs)) {
			if name == "" || strings.ContainsAny(name, " /\n") {
				return fmt.Errorf("path %s: output name %q", r.Path, clip(name))
			}
			if err := checkStorePath(r.Outputs[name], dir); err != nil {
				return fmt.Errorf("path %s: output %s: %w", r.Path, name, err)
			}
		}
		if len(r.Outputs) > 0 && !strings.HasSuffix(r.Path, ".drv") {
			return fmt.Errorf("path %s: has derivation outputs but is not a .drv", r.Path)
		}
	}
	for i, x := range rs.Realisations {
		id := x.ID()
		if x.DrvHash == "" || x.OutputName == "" || strings.ContainsAny(id, " \n") || strings.Count(id, "!") != 1 {
			return fmt.Errorf("realisation %d: id %q is not <drv hash>!<output>", i+1, clip(id))
		}
		if i > 0 && rs.Realisations[i-1].ID() >= id {
			return fmt.Errorf("realisation %s: realisations not sorted or repeated", id)
		}
		if err := checkStorePath(x.OutPath, dir); err != nil {
			return fmt.Errorf("realisation %s: %w", id, err)
		}
		for _, s := range x.Sigs {
			if s == "" || strings.ContainsAny(s, " \t\n") {
				return fmt.Errorf("realisation %s: signature %q is empty or has white space", id, clip(s))
			}
		}
		if !slices.IsSorted(x.Refs) {
			return fmt.Errorf("realisation %s: refs not sorted", id)
		}
	}
	return nil
}

// SortRows sorts paths by path, each path's references, and realisations
// by id.
func SortRows(rs *Rows) {
	slices.SortFunc(rs.Paths, func(a, b Row) int { return strings.Compare(a.Path, b.Path) })
	for i := range rs.Paths {
		slices.Sort(rs.Paths[i].References)
	}
	slices.SortFunc(rs.Realisations, func(a, b Realisation) int { return strings.Compare(a.ID(), b.ID()) })
	for i := range rs.Realisations {
		slices.Sort(rs.Realisations[i].Refs)
	}
}

// StoreDirOf returns the store directory of rs's paths ("" when empty).
func StoreDirOf(rs *Rows) string {
	if len(rs.Paths) == 0 {
		return ""
	}
	return path.Dir(rs.Paths[0].Path)
}

// RowsEqual reports whether two rows are the same in every field.
func RowsEqual(a, b *Row) bool {
	return Equal(a.PathInfo, b.PathInfo) && a.RegistrationTime == b.RegistrationTime && a.Ultimate == b.Ultimate &&
		slices.Equal(a.Sigs, b.Sigs) && a.CA == b.CA && maps.Equal(a.Outputs, b.Outputs)
}

// RowsDelta returns the rows of to that from does not have: paths not in
// from or whose row changed, and realisations not in from or changed.
// Both must be sorted.
func RowsDelta(from, to *Rows) *Rows {
	out := &Rows{}
	i := 0
	for j := range to.Paths {
		b := &to.Paths[j]
		for i < len(from.Paths) && from.Paths[i].Path < b.Path {
			i++
		}
		if i < len(from.Paths) && from.Paths[i].Path == b.Path && RowsEqual(&from.Paths[i], b) {
			continue
		}
		out.Paths = append(out.Paths, *b)
	}
	have := make(map[string]*Realisation, len(from.Realisations))
	for k := range from.Realisations {
		have[from.Realisations[k].ID()] = &from.Realisations[k]
	}
	for _, x := range to.Realisations {
		if y, ok := have[x.ID()]; ok && y.OutPath == x.OutPath && slices.Equal(y.Sigs, x.Sigs) && slices.Equal(y.Refs, x.Refs) {
			continue
		}
		out.Realisations = append(out.Realisations, x)
	}
	return out
}
