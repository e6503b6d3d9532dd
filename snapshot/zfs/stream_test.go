package zfs

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// beginRecord makes a DRR_BEGIN record as zfs send writes it (host byte
// order, little endian here) for toname, incremental when fromguid != 0.
func beginRecord(order binary.ByteOrder, toname string, fromguid uint64) []byte {
	b := make([]byte, zBeginBytes+100)
	order.PutUint32(b[0:4], 0) // DRR_BEGIN
	order.PutUint64(b[8:16], zfsMagic)
	order.PutUint64(b[40:48], 0x1234)
	order.PutUint64(b[48:56], fromguid)
	copy(b[56:], toname)
	return b
}

func TestStreamHead(t *testing.T) {
	for _, tc := range []struct {
		name        string
		in          []byte
		want        string
		incremental bool
		err         string
	}{
		{"whole", beginRecord(binary.LittleEndian, "tank/nix@strata-3", 0), "tank/nix@strata-3", false, ""},
		{"incremental", beginRecord(binary.LittleEndian, "tank/nix@strata-4", 99), "tank/nix@strata-4", true, ""},
		{"big endian sender", beginRecord(binary.BigEndian, "p/n@strata-5", 1), "p/n@strata-5", true, ""},
		{"not a stream", bytes.Repeat([]byte{7}, zBeginBytes), "", false, "not a zfs send stream"},
		{"short", []byte("zfs"), "", false, "read stream header"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			br := bufio.NewReaderSize(bytes.NewReader(tc.in), 64<<10)
			name, incr, err := zstreamHead(br)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || name != tc.want || incr != tc.incremental {
				t.Fatalf("zstreamHead = %q, %v, %v; want %q, %v", name, incr, err, tc.want, tc.incremental)
			}
		})
	}
}

// SendResume refuses a malformed token before running zfs, and a token
// whose snapshot is not one of this dataset's strata snapshots after
// asking `zfs send -nv -t` (fake zfs here).
func TestSendResumeChecksToken(t *testing.T) {
	dir := t.TempDir()
	fake := `#!/bin/sh
echo "zfs $*" >> "` + dir + `/calls"
case "$*" in
"send -nv -t 1-abc-10-def") printf 'resume token contents:\nnvlist version: 0\n\tobject = 0x6\n\ttoname = tank/other@secret\nfull send of tank/other@secret estimated size is 1M\n' ;;
"send -nv -t 1-abc-10-aaa") printf 'resume token contents:\n\ttoname = tank/nix@strata-4\n' ;;
"send -t 1-abc-10-aaa") printf 'STREAM' ;;
*) echo "unexpected $*" >&2; exit 2 ;;
esac
`
	if err := os.WriteFile(filepath.Join(dir, "zfs"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	b := &Backend{dataset: "tank/nix"}
	ctx := context.Background()
	for _, tok := range []string{"", "1-abc-10-def; rm -rf /", "-t", "1-ABC-10-def"} {
		if err := b.SendResume(ctx, io.Discard, tok); err == nil || !strings.Contains(err.Error(), "malformed") {
			t.Errorf("token %q: %v, want malformed", tok, err)
		}
	}
	if err := b.SendResume(ctx, io.Discard, "1-abc-10-def"); err == nil || !strings.Contains(err.Error(), "tank/other@secret") {
		t.Errorf("token of another dataset: %v, want a refusal naming it", err)
	}
	var out bytes.Buffer
	if err := b.SendResume(ctx, &out, "1-abc-10-aaa"); err != nil || out.String() != "STREAM" {
		t.Errorf("token of strata-4: %q, %v", out.String(), err)
	}
	calls, _ := os.ReadFile(filepath.Join(dir, "calls"))
	if strings.Count(string(calls), "send -t") != 1 {
		t.Errorf("zfs calls:\n%s\nwant exactly one real send", calls)
	}
}
