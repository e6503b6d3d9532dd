package btrfs

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"strings"
	"testing"

	"github.com/strata-nix/strata/mountinfo"
)

// sendStream makes the start of a btrfs send stream whose first command is
// cmd with the given attributes (type -> value).
func sendStream(cmd uint16, attrs ...any) []byte {
	var body bytes.Buffer
	for i := 0; i+1 < len(attrs); i += 2 {
		v := []byte(attrs[i+1].(string))
		binary.Write(&body, binary.LittleEndian, uint16(attrs[i].(int)))
		binary.Write(&body, binary.LittleEndian, uint16(len(v)))
		body.Write(v)
	}
	var b bytes.Buffer
	b.WriteString(streamMagic)
	binary.Write(&b, binary.LittleEndian, uint32(1))
	binary.Write(&b, binary.LittleEndian, uint32(body.Len()))
	binary.Write(&b, binary.LittleEndian, cmd)
	binary.Write(&b, binary.LittleEndian, uint32(0)) // crc, not checked here
	b.Write(body.Bytes())
	b.WriteString("rest of the stream")
	return b.Bytes()
}

func TestStreamHead(t *testing.T) {
	uuid := string(make([]byte, 16))
	for _, tc := range []struct {
		name        string
		in          []byte
		want        string
		incremental bool
		err         string
	}{
		{"whole", sendStream(cmdSubvol, attrPath, "strata-7", 1, uuid), "strata-7", false, ""},
		{"incremental", sendStream(cmdSnapshot, 1, uuid, attrPath, "strata-8"), "strata-8", true, ""},
		{"not a stream", []byte(strings.Repeat("x", 64)), "", false, "not a btrfs send stream"},
		{"short", []byte("btrfs-str"), "", false, "read stream header"},
		{"other command first", sendStream(3, attrPath, "x"), "", false, "want a subvolume or snapshot"},
		{"no path", sendStream(cmdSubvol, 1, uuid), "", false, "names no subvolume"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			br := bufio.NewReaderSize(bytes.NewReader(tc.in), maxHead)
			name, incr, err := streamHead(br)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || name != tc.want || incr != tc.incremental {
				t.Fatalf("streamHead = %q, %v, %v; want %q, %v", name, incr, err, tc.want, tc.incremental)
			}
			// Nothing consumed: the whole stream still goes to btrfs receive.
			if rest, _ := br.Peek(len(tc.in)); !bytes.Equal(rest, tc.in) {
				t.Fatal("streamHead consumed bytes")
			}
		})
	}
	// An absurd first command length is refused before reading it.
	b := sendStream(cmdSubvol, attrPath, "strata-1")
	binary.LittleEndian.PutUint32(b[len(streamMagic)+4:], 1<<30)
	if _, _, err := streamHead(bufio.NewReaderSize(bytes.NewReader(b), maxHead)); err == nil {
		t.Fatal("a 1 GiB first command was accepted")
	}
}

// receiveMount picks the mount `btrfs receive -m` needs when the snapshot
// dir's own mount is a bind of a directory (systemd's ReadWritePaths=), and
// nothing when receive's own choice works.
func TestReceiveMount(t *testing.T) {
	const (
		root   = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
		top    = "40 22 0:40 / /srv/strata ro - btrfs /dev/loop0 rw,subvolid=5,subvol=/\n"
		selfRW = "41 40 0:40 /snaps /srv/strata/snaps rw - btrfs /dev/loop0 rw,subvolid=5,subvol=/\n"
	)
	for name, tc := range map[string]struct {
		mountinfo, dir, want string
	}{
		"ReadWritePaths bind of the dir on itself": {root + top + selfRW, "/srv/strata/snaps", "/srv/strata"},
		"dir below the bind":                       {root + top + selfRW, "/srv/strata/snaps/sub", "/srv/strata"},
		"no bind: receive finds the top itself":    {root + top, "/srv/strata/snaps", ""},
		"nspawn: the top is a bind of the host's top into the container": {
			"300 299 0:90 / / rw - overlay overlay rw\n" +
				"310 300 0:40 / /srv/strata rw - btrfs /dev/loop0 rw,subvolid=5,subvol=/\n" +
				"320 310 0:40 /snaps /srv/strata/snaps rw - btrfs /dev/loop0 rw,subvolid=5,subvol=/\n", "/srv/strata/snaps", "/srv/strata"},
		"dir is a subvolume mounted on itself": {root + top +
			"41 40 0:40 /snaps /srv/strata/snaps rw - btrfs /dev/loop0 rw,subvolid=260,subvol=/snaps\n", "/srv/strata/snaps", ""},
		"filesystem mounted from a subvolume": {root +
			"40 22 0:40 /vol /srv ro - btrfs /dev/loop0 rw,subvolid=256,subvol=/vol\n" +
			"41 40 0:40 /vol/snaps /srv/snaps rw - btrfs /dev/loop0 rw,subvolid=256,subvol=/vol\n", "/srv/snaps", "/srv"},
		"bind from elsewhere, no subvolume root above it": {root +
			"40 22 0:40 / /mnt/top rw - btrfs /dev/loop0 rw,subvolid=5,subvol=/\n" +
			"41 22 0:40 /snaps /srv/snaps rw - btrfs /dev/loop0 rw,subvolid=5,subvol=/\n", "/srv/snaps", ""},
		"the top is another btrfs": {root +
			"40 22 0:41 / /srv/strata ro - btrfs /dev/loop1 rw,subvolid=5,subvol=/\n" +
			"41 40 0:40 /snaps /srv/strata/snaps rw - btrfs /dev/loop0 rw,subvolid=5,subvol=/\n", "/srv/strata/snaps", ""},
		"the top shows the dir elsewhere": {root + top +
			"41 40 0:40 /other /srv/strata/snaps rw - btrfs /dev/loop0 rw,subvolid=5,subvol=/\n", "/srv/strata/snaps", ""},
		"not btrfs": {root, "/srv/strata/snaps", ""},
	} {
		t.Run(name, func(t *testing.T) {
			ms, err := mountinfo.Parse(strings.NewReader(tc.mountinfo))
			if err != nil {
				t.Fatal(err)
			}
			if got := receiveMount(ms, tc.dir); got != tc.want {
				t.Errorf("receiveMount(%s) = %q, want %q", tc.dir, got, tc.want)
			}
		})
	}
}
