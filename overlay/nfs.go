package overlay

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultNFSPort is the strata server's default NFS (and MOUNT) port.
const DefaultNFSPort = 2049

// NFSOptions are the options of a builder's NFS mount of a generation. This
// is the one place in strata that writes NFS mount options. String renders
//
//	vers=3,proto=tcp,port=P,mountport=P,mountproto=tcp,nolock,ro,hard[,nconnect=N][,nosharecache],addr=IP,mountaddr=IP[,extra...]
//
// and every option is there for a reason:
//   - vers=3,proto=tcp: the strata server speaks NFSv3 over TCP only.
//   - port=P,mountport=P,mountproto=tcp: the server answers the MOUNT and
//     NFS programs on one TCP port and runs no portmapper, so the kernel must
//     not ask rpcbind for either port.
//   - nolock: no NLM lock manager on the server; the export is read-only, so
//     locks are kept local to the client.
//   - no noacl: the server answers NFSACL's GETACL with "no ACL", and the
//     client must ask. An NFSv3 superblock always has SB_POSIXACL, so a
//     user who does not own a file (a Nix build user in the sandbox, any
//     non-root user) who opens it through the overlay makes overlayfs ask
//     this mount for the file's ACL; with noacl the client answers
//     EOPNOTSUPP and the open fails with "Operation not supported".
//   - ro: the export is read-only (writes would get NFS3ERR_ROFS anyway);
//     the mount is also made with MS_RDONLY.
//   - hard: an operation retries forever while the server is away instead
//     of failing with EIO, so a server restart stalls builds instead of
//     breaking them (invariant 5; file handles survive the restart).
//   - nconnect=N: N TCP connections per mount. The server handles each
//     connection's requests one at a time, so parallel readers need several.
//     Omitted when NConnect is 0 or 1.
//   - nosharecache: by default the kernel shares one superblock and cache
//     between mounts of the same server with the same fsid, and the server
//     reports fsid 0 for every generation; during a rotation a builder
//     mounts two generations at once, which must not share a cache. Present
//     unless ShareCache is true.
//   - addr=IP,mountaddr=IP: the kernel's text mount data takes numeric
//     addresses only (name resolution is mount.nfs's job, which is not
//     used), so MountNFS resolves the server name first.
type NFSOptions struct {
	// Port is the server's NFS and MOUNT port; 0 means DefaultNFSPort.
	Port int
	// NConnect is the number of TCP connections (1-16); 0 means 1.
	NConnect int
	// Addr is the server's numeric IP address. Empty: MountNFS resolves it
	// from the server name.
	Addr string
	// ShareCache lets mounts of the same server share one superblock
	// (omits nosharecache). Leave false on builders.
	ShareCache bool
	// Extra options are appended as given (e.g. "timeo=600"); none may
	// contain a comma.
	Extra []string
}

// Validate checks ranges and syntax (not reachability).
func (o NFSOptions) Validate() error {
	if o.Port < 0 || o.Port > 65535 {
		return fmt.Errorf("nfs options: port %d out of range 1-65535", o.Port)
	}
	if o.NConnect < 0 || o.NConnect > 16 {
		return fmt.Errorf("nfs options: nconnect %d out of range 1-16", o.NConnect)
	}
	if o.Addr != "" {
		if _, err := netip.ParseAddr(o.Addr); err != nil {
			return fmt.Errorf("nfs options: addr %q is not a numeric IP address", o.Addr)
		}
	}
	for _, e := range o.Extra {
		if err := CheckExtraNFSOption(e); err != nil {
			return fmt.Errorf("nfs options: %w", err)
		}
	}
	return nil
}

// reservedNFSOptions are the options String decides (or leaves out on
// purpose), by name as the kernel's NFS option parser knows them, each
// with why an extra option may not set it: the kernel keeps the last
// value given, so an extra option would silently win over strata's.
var reservedNFSOptions = func() map[string]string {
	m := map[string]string{}
	for _, r := range []struct {
		names []string
		why   string
	}{
		{[]string{"vers", "nfsvers", "v2", "v3", "v4", "v4.0", "v4.1", "v4.2", "minorversion"},
			"the strata server speaks NFSv3 only (strata sets vers=3)"},
		{[]string{"proto", "tcp", "udp", "udp6", "tcp6", "rdma"},
			"the strata server answers over TCP only (strata sets proto=tcp)"},
		{[]string{"port", "mountport", "mountproto", "mountvers"},
			"the strata server answers NFS and MOUNT on one TCP port and runs no portmapper (strata sets both ports from server.nfs)"},
		{[]string{"addr", "mountaddr", "mounthost", "clientaddr"},
			"strata resolves the server and sets its address itself (set server.nfs instead)"},
		{[]string{"soft", "hard", "softerr", "intr", "nointr"},
			"strata mounts hard, so a server restart stalls reads instead of failing them with EIO (DESIGN.md invariant 5)"},
		{[]string{"ro", "rw"},
			"generations are read-only (strata sets ro)"},
		{[]string{"acl", "noacl"},
			"build users need the server's POSIX ACL answer; with noacl they get \"Operation not supported\" on generation files"},
		{[]string{"sharecache", "nosharecache"},
			"two generations mounted at once must not share one cache (strata sets nosharecache)"},
		{[]string{"lock", "nolock", "local_lock"},
			"the strata server runs no lock manager (strata sets nolock)"},
		{[]string{"nconnect"},
			"set mount.nconnect instead"},
	} {
		for _, n := range r.names {
			m[n] = r.why
		}
	}
	return m
}()

// CheckExtraNFSOption checks one extra NFS mount option (NFSOptions.Extra,
// the builder's mount.options): not empty, no comma or space, and not one
// strata decides itself (vers, proto, port, mountport, mountproto, addr,
// mountaddr, soft/hard, ro/rw, acl/noacl, sharecache/nosharecache,
// lock/nolock, nconnect and their aliases); the error names the option and
// why. Tuning options (rsize, wsize, timeo, retrans, actimeo, ac/noac, ...)
// pass.
func CheckExtraNFSOption(opt string) error {
	if opt == "" || strings.ContainsAny(opt, ", \t\n") {
		return fmt.Errorf("extra option %q is empty or contains a comma or space", opt)
	}
	name, _, _ := strings.Cut(strings.ToLower(opt), "=")
	if why, ok := reservedNFSOptions[name]; ok {
		return fmt.Errorf("extra option %q sets %s, which strata decides: %s", opt, name, why)
	}
	return nil
}

// String renders the mount data given to mount(2). Addr must be set for a
// usable result (MountNFS sets it).
func (o NFSOptions) String() string {
	port := o.Port
	if port == 0 {
		port = DefaultNFSPort
	}
	p := strconv.Itoa(port)
	opts := []string{"vers=3", "proto=tcp", "port=" + p, "mountport=" + p, "mountproto=tcp",
		"nolock", "ro", "hard"}
	if o.NConnect > 1 {
		opts = append(opts, "nconnect="+strconv.Itoa(o.NConnect))
	}
	if !o.ShareCache {
		opts = append(opts, "nosharecache")
	}
	if o.Addr != "" {
		opts = append(opts, "addr="+o.Addr, "mountaddr="+o.Addr)
	}
	opts = append(opts, o.Extra...)
	return strings.Join(opts, ",")
}

// NFSSource returns the mount source "server:/export" ("[v6addr]:/export"
// for an IPv6 literal), as mountinfo shows it.
func NFSSource(server, exportPath string) string {
	if a, err := netip.ParseAddr(server); err == nil && a.Is6() && !a.Is4In6() {
		return "[" + server + "]:" + exportPath
	}
	return server + ":" + exportPath
}

// ResolveNFSAddr returns server as a numeric address: itself if it already
// is one, else the first IPv4 address the resolver gives (an IPv6 one if
// there is none).
func ResolveNFSAddr(ctx context.Context, server string) (string, error) {
	if a, err := netip.ParseAddr(server); err == nil {
		return a.String(), nil
	}
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", server)
	if err != nil {
		return "", fmt.Errorf("resolve nfs server %s: %w", server, err)
	}
	for _, a := range addrs {
		if a.Unmap().Is4() {
			return a.Unmap().String(), nil
		}
	}
	if len(addrs) == 0 {
		return "", fmt.Errorf("resolve nfs server %s: no address", server)
	}
	return addrs[0].String(), nil
}

// MountNFS mounts exportPath (e.g. "/gen/7") of the strata NFS server at
// server (a host name or IP) read-only on target, with the kernel's NFS
// client: mount(2) with source "server:/gen/7", type "nfs", MS_RDONLY and
// opts rendered by NFSOptions.String. When opts.Addr is empty the server
// name is resolved first.
//
// ctx bounds the name resolution only. The mount syscall itself cannot be
// cancelled; the kernel gives up on an unreachable server after its own
// MOUNT RPC timeout. Unmount with Detach, which never touches the server.
func MountNFS(ctx context.Context, server, exportPath, target string, opts NFSOptions) error {
	fail := func(err error) error {
		return fmt.Errorf("mount nfs %s on %s: %w", NFSSource(server, exportPath), target, err)
	}
	if err := ctx.Err(); err != nil {
		return fail(err)
	}
	if server == "" || strings.ContainsAny(server, ",: \t\n/") && !isIP(server) {
		return fail(fmt.Errorf("bad server name %q", server))
	}
	if !path.IsAbs(exportPath) || strings.ContainsAny(exportPath, ", \t\n") {
		return fail(fmt.Errorf("export path %q must be absolute, without commas or spaces", exportPath))
	}
	if err := opts.Validate(); err != nil {
		return fail(err)
	}
	if opts.Addr == "" {
		a, err := ResolveNFSAddr(ctx, server)
		if err != nil {
			return fail(err)
		}
		opts.Addr = a
	}
	data := opts.String()
	err := retryEINTR(func() error {
		return unix.Mount(NFSSource(server, exportPath), target, "nfs", unix.MS_RDONLY, data)
	})
	if errors.Is(err, unix.ENODEV) {
		return fail(fmt.Errorf("%w (no NFS client in this kernel: load the nfs module)", err))
	}
	if err != nil {
		return fail(fmt.Errorf("%w (options %s)", err, data))
	}
	return nil
}

func isIP(s string) bool {
	_, err := netip.ParseAddr(s)
	return err == nil
}

// CheckNFSACL reports whether the NFS mount at dir answers POSIX ACL
// queries, which overlayfs makes whenever a user who does not own a file
// (a Nix build user, anyone but root) opens it through an overlay on the
// mount. It returns an error naming the consequence when the client says
// EOPNOTSUPP (a server without NFSACL, such as a strata server older than
// its GETACL answer, or a mount with noacl); nil when the query is answered
// (no ACL: ENODATA) or fails otherwise (the mount itself is not its
// concern).
func CheckNFSACL(dir string) error {
	_, err := unix.Getxattr(dir, "system.posix_acl_access", nil)
	if errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("nfs mount %s answers no POSIX ACL query (a server without NFSACL GETACL, or the mount option noacl): "+
			"users other than the files' owner, such as Nix build users with sandbox = true, get \"Operation not supported\" opening its files through the overlay", dir)
	}
	return nil
}
