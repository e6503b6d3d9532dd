package zfs

import (
	"context"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	gozfs "github.com/mistifyio/go-zfs/v3"

	"github.com/strata-nix/strata/snapshot"
)

// The unit tests run the backend against fake zfs, mount and umount
// executables (shell scripts put first on PATH). They record their argv and
// answer like OpenZFS 2.3 does: `zfs list -Hp` prints tab-separated raw
// values with "-" for unset ones, errors go to stderr with exit status 1.
// The fake keeps its snapshots as files in a state directory, and mount and
// umount edit a fake mountinfo file.

const fakeZFS = `#!/bin/sh
S="$FAKEZFS_STATE"
echo "zfs $*" >> "$S/calls"
eval "last=\${$#}"
key() { printf %s "$1" | tr / %; }
fsline() { # name mountpoint type
	printf '%s\t-\t1069056\t10254471168\t%s\toff\t%s\t-\t0\t1044480\t1044480\t2058752\t1044480\n' "$1" "$2" "$3"
}
snapline() {
	printf '%s\t-\t0\t-\t-\t-\tsnapshot\t-\t-\t8503296\t8503296\t-\t-\n' "$1"
}
case "$1" in
list)
	case "$2" in
	-Hp)
		if [ "$last" = "$FAKEZFS_DATASET" ]; then fsline "$last" "$FAKEZFS_MOUNTPOINT" "${FAKEZFS_TYPE:-filesystem}"
		elif [ -f "$S/snaps/$(key "$last")" ]; then snapline "$last"
		else echo "cannot open '$last': dataset does not exist" >&2; exit 1; fi ;;
	-rHp)
		case "$4" in
		filesystem)
			fsline "$FAKEZFS_DATASET" "$FAKEZFS_MOUNTPOINT" filesystem
			[ -n "$FAKEZFS_CHILD_MP" ] && fsline "$FAKEZFS_DATASET/child" "$FAKEZFS_CHILD_MP" filesystem
			true ;;
		snapshot)
			for f in $(ls "$S/snaps"); do snapline "$(printf %s "$f" | tr % /)"; done ;;
		esac ;;
	esac ;;
snapshot)
	if [ -f "$S/fail-snapshot" ]; then echo "cannot create snapshot '$2': out of space" >&2; exit 1; fi
	if [ -f "$S/snaps/$(key "$2")" ]; then echo "cannot create snapshot '$2': dataset already exists" >&2; exit 1; fi
	echo 1795268545 > "$S/snaps/$(key "$2")" ;;
set)
	k=$(key "$3"); prop=${2%%=*}
	[ -f "$S/snaps/$k" ] || { echo "cannot open '$3': dataset does not exist" >&2; exit 1; }
	touch "$S/props/$k"; grep -v "^$prop	" "$S/props/$k" > "$S/props/$k.new"
	printf '%s\t%s\n' "$prop" "${2#*=}" >> "$S/props/$k.new"; mv "$S/props/$k.new" "$S/props/$k" ;;
inherit)
	k=$(key "$3")
	touch "$S/props/$k"; grep -v "^$2	" "$S/props/$k" > "$S/props/$k.new"; mv "$S/props/$k.new" "$S/props/$k" ;;
get)
	for f in $(ls "$S/snaps"); do
		n=$(printf %s "$f" | tr % /)
		case "$last" in
		*@*) [ "$n" = "$last" ] || continue ;;
		*) case "$n" in "$last"@*) ;; *) continue ;; esac ;;
		esac
		case " $* " in
		*" all "*) if [ -f "$S/props/$f" ]; then while IFS= read -r l; do printf '%s\t%s\n' "$n" "$l"; done < "$S/props/$f"; fi ;;
		*) printf '%s\t%s\n' "$n" "$(cat "$S/snaps/$f")" ;;
		esac
	done ;;
destroy)
	if [ ! -f "$S/snaps/$(key "$last")" ]; then echo "could not find any snapshots to destroy; check snapshot names." >&2; exit 1; fi
	rm -f "$S/snaps/$(key "$last")" "$S/props/$(key "$last")" ;;
*) echo "fake zfs: unexpected $*" >&2; exit 2 ;;
esac
`

const fakeMount = `#!/bin/sh
S="$FAKEZFS_STATE"
echo "mount $*" >> "$S/calls"
if [ -f "$S/fail-mount" ]; then echo "mount: $6: permission denied" >&2; exit 32; fi
echo "900 1 0:99 / $6 ro,relatime shared:9 - $2 $5 ro,xattr,noacl" >> "$S/mountinfo"
`

const fakeUmount = `#!/bin/sh
S="$FAKEZFS_STATE"
echo "umount $*" >> "$S/calls"
grep -v " $1 ro," "$S/mountinfo" > "$S/mountinfo.new"; mv "$S/mountinfo.new" "$S/mountinfo"
`

type fake struct {
	state, mountpoint, mountDir string
}

const dsProps = "name,origin,used,available,mountpoint,compression,type,volsize,quota,referenced,written,logicalused,usedbydataset"

func newFake(t *testing.T) *fake {
	t.Helper()
	dir := t.TempDir()
	f := &fake{
		state:      filepath.Join(dir, "state"),
		mountpoint: filepath.Join(dir, "tank", "store"),
		mountDir:   filepath.Join(dir, "gens"),
	}
	bin := filepath.Join(dir, "bin")
	for _, d := range []string{bin, filepath.Join(f.state, "snaps"), filepath.Join(f.state, "props"), filepath.Join(f.mountpoint, "store"), filepath.Join(f.mountpoint, "var/nix/db")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, script := range map[string]string{"zfs": fakeZFS, "mount": fakeMount, "umount": fakeUmount} {
		if err := os.WriteFile(filepath.Join(bin, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Snapshots strata must ignore: a foreign name, a child's strata name,
	// a name that is not a strata id.
	for _, s := range []string{"tank/store@manual", "tank/store/child@strata-9", "tank/store@strata-07", "tank/storex@strata-8"} {
		f.touch(t, "snaps/"+strings.ReplaceAll(s, "/", "%"))
	}
	// an empty mount table; the fake mount and umount edit it
	if err := os.WriteFile(filepath.Join(f.state, "mountinfo"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	t.Setenv("FAKEZFS_STATE", f.state)
	t.Setenv("FAKEZFS_DATASET", "tank/store")
	t.Setenv("FAKEZFS_MOUNTPOINT", f.mountpoint)
	return f
}

func (f *fake) touch(t *testing.T, rel string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(f.state, rel), []byte("1795268000\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// calls returns the commands issued since the last call and forgets them.
func (f *fake) calls(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(f.state, "calls"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	_ = os.Remove(filepath.Join(f.state, "calls"))
	return slices.DeleteFunc(strings.Split(string(b), "\n"), func(s string) bool { return s == "" })
}

func wantCalls(t *testing.T, f *fake, want ...string) {
	t.Helper()
	got := f.calls(t)
	if !slices.Equal(got, want) {
		t.Errorf("commands:\n  got  %q\n  want %q", got, want)
	}
}

func (f *fake) backend(t *testing.T) *Backend {
	t.Helper()
	b, err := New("tank/store", f.mountDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	b.mountinfo = filepath.Join(f.state, "mountinfo")
	f.calls(t)
	return b
}

func TestNew(t *testing.T) {
	f := newFake(t)
	b, err := New("tank/store", f.mountDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	wantCalls(t, f, "zfs list -Hp -o "+dsProps+" tank/store", "zfs list -rHp -t filesystem -o "+dsProps+" tank/store")
	if b.Kind() != "zfs" || b.Dataset() != "tank/store" || b.MountDir() != f.mountDir {
		t.Errorf("backend = %s %s %s", b.Kind(), b.Dataset(), b.MountDir())
	}
	if st, err := os.Stat(f.mountDir); err != nil || !st.IsDir() {
		t.Errorf("mount dir not made: %v", err)
	}
}

func TestNewErrors(t *testing.T) {
	for _, c := range []struct {
		name, dataset string
		env           map[string]string
		want          string
		zfsError      bool
	}{
		{name: "missing", dataset: "tank/nope", want: "cannot open 'tank/nope': dataset does not exist", zfsError: true},
		{name: "volume", dataset: "tank/store", env: map[string]string{"FAKEZFS_TYPE": "volume"}, want: "is a volume, not a filesystem"},
		{name: "snapshot name", dataset: "tank/store@x", want: `"tank/store@x": not a filesystem dataset name`},
		{name: "child on store", dataset: "tank/store", env: map[string]string{"FAKEZFS_CHILD_MP": "MP/store/sub"}, want: "child dataset tank/store/child is mounted at"},
		{name: "child on db", dataset: "tank/store", env: map[string]string{"FAKEZFS_CHILD_MP": "MP/var/nix/db"}, want: "inside the store"},
		{name: "no db", dataset: "tank/store", env: map[string]string{"RMDB": "1"}, want: "var/nix/db: store root must hold"},
		{name: "mount dir inside", dataset: "tank/store", env: map[string]string{"INSIDE": "1"}, want: "inside dataset tank/store's mountpoint"},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFake(t)
			mountDir := f.mountDir
			for k, v := range c.env {
				switch k {
				case "RMDB":
					os.RemoveAll(filepath.Join(f.mountpoint, "var"))
				case "INSIDE":
					mountDir = filepath.Join(f.mountpoint, "gens")
				default:
					t.Setenv(k, strings.ReplaceAll(v, "MP", f.mountpoint))
				}
			}
			_, err := New(c.dataset, mountDir, nil)
			if err == nil {
				t.Fatal("New succeeded, want an error")
			}
			if !errors.Is(err, snapshot.ErrUnsupported) {
				t.Errorf("err = %v, want it to wrap ErrUnsupported", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("err = %q, want it to contain %q", err, c.want)
			}
			var ze *gozfs.Error
			if c.zfsError && !errors.As(err, &ze) {
				t.Errorf("err = %v, want a *zfs.Error in its chain", err)
			}
		})
	}
}

func TestCreateListDestroy(t *testing.T) {
	f := newFake(t)
	b := f.backend(t)
	ctx := context.Background()
	path1 := filepath.Join(f.mountDir, "strata-1")
	listSnaps := "zfs list -rHp -t snapshot -o " + dsProps + " tank/store"

	s, err := b.Create(ctx, 1, snapshot.Labels{"state": "publishing", "generation": "1", "skipped": ""})
	if err != nil {
		t.Fatal(err)
	}
	wantCalls(t, f,
		listSnaps,
		"zfs snapshot tank/store@strata-1",
		"zfs list -Hp -o "+dsProps+" tank/store@strata-1",
		"zfs set strata:generation=1 tank/store@strata-1",
		"zfs set strata:state=publishing tank/store@strata-1",
		"zfs get -Hp -o name,value -t snapshot creation tank/store@strata-1",
		"mount -t zfs -o ro tank/store@strata-1 "+path1,
	)
	want := snapshot.Snapshot{ID: 1, Name: "strata-1", Path: path1, Created: time.Unix(1795268545, 0),
		Labels: snapshot.Labels{"generation": "1", "state": "publishing"}}
	if !sameSnap(s, want) {
		t.Errorf("Create(1) = %+v, want %+v", s, want)
	}

	if _, err := b.Create(ctx, 1, nil); !errors.Is(err, snapshot.ErrExists) {
		t.Errorf("second Create(1): err = %v, want ErrExists", err)
	}
	wantCalls(t, f, listSnaps)

	if _, err := b.Create(ctx, 2, nil); err != nil {
		t.Fatal(err)
	}
	f.calls(t)

	l, err := b.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wantCalls(t, f, listSnaps, "zfs get -Hp -o name,value -t snapshot -d 1 creation tank/store",
		"zfs get -Hp -o name,property,value -s local,received -t snapshot -d 1 all tank/store")
	if len(l) != 2 || !sameSnap(l[0], want) || l[1].ID != 2 || l[1].Path != filepath.Join(f.mountDir, "strata-2") ||
		l[1].Labels == nil || len(l[1].Labels) != 0 {
		t.Errorf("List = %+v, want strata-1 and strata-2 only", l)
	}

	if err := b.SetLabels(ctx, 1, snapshot.Labels{"state": "live", "generation": "", "pin_name": "a b"}); err != nil {
		t.Fatal(err)
	}
	wantCalls(t, f, listSnaps,
		"zfs inherit strata:generation tank/store@strata-1",
		"zfs set strata:pin_name=a b tank/store@strata-1",
		"zfs set strata:state=live tank/store@strata-1")
	if l, err := b.List(ctx); err != nil || !maps.Equal(l[0].Labels, snapshot.Labels{"state": "live", "pin_name": "a b"}) {
		t.Errorf("List after SetLabels = %+v, %v", l, err)
	}
	f.calls(t)
	if err := b.SetLabels(ctx, 7, snapshot.Labels{"state": "live"}); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("SetLabels(7): err = %v, want ErrNotFound", err)
	}
	wantCalls(t, f, listSnaps)

	// After a reboot nothing is mounted: List mounts every snapshot again.
	if err := os.WriteFile(filepath.Join(f.state, "mountinfo"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := b.List(ctx); err != nil {
		t.Fatal(err)
	}
	got := f.calls(t)
	for _, w := range []string{"mount -t zfs -o ro tank/store@strata-1 " + path1, "mount -t zfs -o ro tank/store@strata-2 " + filepath.Join(f.mountDir, "strata-2")} {
		if !slices.Contains(got, w) {
			t.Errorf("List after reboot: commands %q, want %q among them", got, w)
		}
	}

	if err := b.Destroy(ctx, 1); err != nil {
		t.Fatal(err)
	}
	wantCalls(t, f, listSnaps, "umount "+path1, "zfs destroy tank/store@strata-1")
	if _, err := os.Stat(path1); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("mount dir %s left after Destroy: %v", path1, err)
	}
	if err := b.Destroy(ctx, 1); !errors.Is(err, snapshot.ErrNotFound) {
		t.Errorf("second Destroy(1): err = %v, want ErrNotFound", err)
	}
	wantCalls(t, f, listSnaps)
	for _, foreign := range []string{"tank%store@manual", "tank%store%child@strata-9", "tank%store@strata-07"} {
		if _, err := os.Stat(filepath.Join(f.state, "snaps", foreign)); err != nil {
			t.Errorf("foreign snapshot %s touched: %v", foreign, err)
		}
	}
}

func TestCreateErrors(t *testing.T) {
	t.Run("zfs stderr", func(t *testing.T) {
		f := newFake(t)
		b := f.backend(t)
		f.touch(t, "fail-snapshot")
		_, err := b.Create(context.Background(), 3, nil)
		if err == nil || !strings.Contains(err.Error(), "cannot create snapshot 'tank/store@strata-3': out of space") {
			t.Errorf("err = %v, want zfs's stderr in it", err)
		}
		var ze *gozfs.Error
		if !errors.As(err, &ze) {
			t.Errorf("err = %v, want a *zfs.Error in its chain", err)
		}
	})
	t.Run("mount fails", func(t *testing.T) {
		f := newFake(t)
		b := f.backend(t)
		f.touch(t, "fail-mount")
		_, err := b.Create(context.Background(), 3, nil)
		if err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Errorf("err = %v, want mount's error", err)
		}
		got := f.calls(t)
		if !slices.Contains(got, "zfs destroy tank/store@strata-3") {
			t.Errorf("commands %q: want the snapshot destroyed again", got)
		}
		if _, err := os.Stat(filepath.Join(f.state, "snaps", "tank%store@strata-3")); !errors.Is(err, os.ErrNotExist) {
			t.Error("snapshot left behind by a failed Create")
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		f := newFake(t)
		b := f.backend(t)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := b.Create(ctx, 3, nil); !errors.Is(err, context.Canceled) {
			t.Errorf("Create: err = %v, want context.Canceled", err)
		}
		if _, err := b.List(ctx); !errors.Is(err, context.Canceled) {
			t.Errorf("List: err = %v, want context.Canceled", err)
		}
		if err := b.Destroy(ctx, 3); !errors.Is(err, context.Canceled) {
			t.Errorf("Destroy: err = %v, want context.Canceled", err)
		}
		wantCalls(t, f)
	})
	t.Run("id 0", func(t *testing.T) {
		f := newFake(t)
		b := f.backend(t)
		if _, err := b.Create(context.Background(), 0, nil); err == nil {
			t.Error("Create(0) succeeded")
		}
		wantCalls(t, f)
	})
	t.Run("something else mounted", func(t *testing.T) {
		f := newFake(t)
		b := f.backend(t)
		p := filepath.Join(f.mountDir, "strata-3")
		if err := os.WriteFile(filepath.Join(f.state, "mountinfo"), []byte("50 1 0:40 / "+p+" rw shared:2 - tmpfs tmpfs rw\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := b.Create(context.Background(), 3, nil)
		if err == nil || !strings.Contains(err.Error(), "tmpfs tmpfs is mounted there") {
			t.Errorf("err = %v, want a refusal to mount over tmpfs", err)
		}
	})
}

func sameSnap(a, b snapshot.Snapshot) bool {
	return a.ID == b.ID && a.Name == b.Name && a.Path == b.Path && a.Created.Equal(b.Created) && maps.Equal(a.Labels, b.Labels)
}

func TestInspectChangesNothing(t *testing.T) {
	f := newFake(t)
	b := f.backend(t)
	ctx := context.Background()
	if _, err := b.Create(ctx, 1, snapshot.Labels{"generation": "1"}); err != nil {
		t.Fatal(err)
	}
	// After a reboot nothing is mounted; Inspect must not mount.
	if err := os.WriteFile(filepath.Join(f.state, "mountinfo"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "no-such-mount-dir")
	ib, err := Inspect("tank/store", missing, nil)
	if err != nil {
		t.Fatal(err)
	}
	ib.mountinfo = filepath.Join(f.state, "mountinfo")
	f.calls(t)
	l, err := ib.List(ctx)
	if err != nil || len(l) != 1 || l[0].Labels["generation"] != "1" {
		t.Fatalf("Inspect List = %+v, %v", l, err)
	}
	if _, err := ib.Create(ctx, 2, nil); err == nil {
		t.Error("Create through Inspect succeeded")
	}
	if err := ib.SetLabels(ctx, 1, snapshot.Labels{"state": "live"}); err == nil {
		t.Error("SetLabels through Inspect succeeded")
	}
	if err := ib.Destroy(ctx, 1); err == nil {
		t.Error("Destroy through Inspect succeeded")
	}
	for _, c := range f.calls(t) {
		if !strings.HasPrefix(c, "zfs list ") && !strings.HasPrefix(c, "zfs get ") {
			t.Errorf("Inspect ran %q", c)
		}
	}
	if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Inspect made the mount dir: %v", err)
	}
}
