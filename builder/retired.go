package builder

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/strata-nix/strata/mountinfo"
	"github.com/strata-nix/strata/overlay"
)

// Retired is an overlay a swap (rotation or failover) took off the store
// dir that processes may still use. Detaching it does not end it: a Nix
// sandbox (its own mount namespace, with bind mounts of the store paths it
// was given), a service with private mounts, or a process whose cwd, root,
// executable, open file or mapped file is on it keeps the overlay, and with it the NFS
// lowers of its generations, alive in the kernel. While anything does, its
// generations stay held (Holding: gossip, and so the servers' retention)
// and its workdir is kept (copy-ups through it need it); InUse (see
// overlay.InUse) is asked on each release and each check
// (rotate.check_interval), and once nothing uses it, it is dropped.
type Retired struct {
	// Generations are its lowers' generations, top first.
	Generations []uint64         `json:"generations"`
	Overlay     overlay.Detached `json:"overlay"`
	// Boot is the kernel's boot id when it was detached: after a reboot
	// nothing uses it.
	Boot  string    `json:"boot_id"`
	Since time.Time `json:"since"`
}

// bootID returns the kernel's boot id ("" if unreadable).
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// retiring describes the overlay visible at the store dir, which a swap to
// an overlay of lowers next is about to detach, as a Retired; ok is false
// when none of the agent's overlays is visible or the mount table has no
// device for it. Only NFS lowers that next does not use are listed with
// it: a lower that stays mounted is held anyway, and a bind of a local
// directory shares its device with everything on that filesystem.
func (a *Agent) retiring(lowers, next []Lower) (Retired, bool) {
	ms, err := a.m.Mounts()
	if err != nil {
		a.log.Warn("read the mount table before a swap: the old overlay will not be held while still in use", "err", err)
		return Retired{}, false
	}
	_, top, ok := a.ourOverlays(ms)
	if !ok || overlay.DevOf(top).IsZero() {
		return Retired{}, false
	}
	l, err := overlay.LayersOf(top)
	if err != nil {
		return Retired{}, false
	}
	r := Retired{Generations: gens(lowers), Boot: bootID(), Since: time.Now(),
		Overlay: overlay.Detached{Dev: overlay.DevOf(top), MountID: top.ID, MountIDUnique: a.uniqueID(a.cfg.StoreDir, top), Work: filepath.Clean(l.Work)}}
	for _, x := range lowers {
		if slices.ContainsFunc(next, func(n Lower) bool { return n.name() == x.name() }) {
			continue
		}
		if m, ok := mountinfo.Top(ms, a.lowerPath(x)); ok && strings.HasPrefix(m.FSType, "nfs") {
			r.Overlay.Lowers = append(r.Overlay.Lowers, overlay.DetachedLower{Dev: overlay.DevOf(m), FSType: m.FSType, Source: m.Source,
				MountIDUnique: a.uniqueID(a.lowerPath(x), m)})
		}
	}
	return r, true
}

// uniqueID is the unique mount id of m, the top mount at path (see
// overlay.IdentityOf); 0 (InUse then compares device and mount id) when
// the kernel has none or path no longer shows m.
func (a *Agent) uniqueID(path string, m mountinfo.Mount) uint64 {
	u, err := overlay.IdentityOf(path, m)
	if err != nil {
		a.log.Warn("identify a mount before a swap: its users are recognized by device and mount id only", "err", err)
	}
	return u
}

// withRetired returns rs with r added (replacing one with the same
// workdir).
func withRetired(rs []Retired, r Retired) []Retired {
	out := withoutRetired(rs, r.Overlay.Work)
	return append(out, r)
}

// withoutRetired returns rs without the one whose workdir is work.
func withoutRetired(rs []Retired, work string) []Retired {
	return slices.DeleteFunc(slices.Clone(rs), func(x Retired) bool { return x.Overlay.Work == work })
}

// sweepRetired asks which retired overlays are still in use and drops the
// others (their generations are no longer held; their workdirs go at the
// next prune). It reports whether it dropped any. An error reading /proc
// keeps them all.
func (a *Agent) sweepRetired() bool {
	st := a.State()
	if len(st.Retired) == 0 {
		return false
	}
	boot := bootID()
	var ask []overlay.Detached
	var idx []int
	for i, r := range st.Retired {
		if r.Boot == boot {
			ask = append(ask, r.Overlay)
			idx = append(idx, i)
		}
	}
	used := make([]bool, len(st.Retired))
	if len(ask) > 0 {
		began := time.Now()
		u, refused, err := a.inUse(ask)
		a.log.Debug("looked for users of detached overlays", "overlays", len(ask), "took", time.Since(began))
		if err != nil {
			a.log.Warn("cannot tell whether detached overlays are still in use; their generations stay held", "err", err)
			return false
		}
		if refused > 0 {
			lvl := slog.LevelDebug
			if !a.refusedLogged {
				lvl, a.refusedLogged = slog.LevelWarn, true
			}
			a.log.Log(context.Background(), lvl, "some processes could not be inspected for use of detached overlays: without CAP_SYS_PTRACE they count as using them (their generations stay held while they run); with it they are protected beyond it and are not counted",
				"processes", refused)
		}
		for j, i := range idx {
			used[i] = u[j]
		}
	}
	var keep []Retired
	for i, r := range st.Retired {
		if used[i] {
			keep = append(keep, r)
			continue
		}
		a.log.Info("a detached overlay is no longer in use; its generations are released", "generations", r.Generations,
			"dev", r.Overlay.Dev.String(), "workdir", r.Overlay.Work, "held_for", time.Since(r.Since).Round(time.Second))
	}
	if len(keep) == len(st.Retired) {
		return false
	}
	if err := a.transition(func(s *State) {
		s.Retired = slices.DeleteFunc(slices.Clone(s.Retired), func(x Retired) bool {
			return !slices.ContainsFunc(keep, func(k Retired) bool { return k.Overlay.Work == x.Overlay.Work })
		})
	}); err != nil {
		a.log.Error("persist state", "err", err)
		return false
	}
	return true
}
