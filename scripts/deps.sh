#!/usr/bin/env bash
# deps.sh installs what strata's demo and tests need on a fresh Debian 12
# machine, as root: Debian packages and a Go toolchain. It is idempotent and
# quick when everything is present. Usage: scripts/deps.sh [base|vm|bench|deploy|nix-trixie]...
set -euo pipefail

want=(nix-bin btrfs-progs busybox-static cpio libnfs-utils sqlite3 iproute2 xz-utils kmod util-linux curl ca-certificates)
for tier in "$@"; do
	case "$tier" in
	base) ;;
	vm) want+=(qemu-system-x86 binutils) ;;
	bench) want+=(nfs-ganesha nfs-ganesha-vfs rpcbind rsync) ;;
	deploy) want+=(mmdebstrap systemd-container ansible-core ansible-lint yamllint openssh-client btrfs-progs e2fsprogs) ;;
	nix-trixie) trixie=1 ;;
	*) echo "deps.sh: unknown tier $tier (want base, vm, bench, deploy or nix-trixie)" >&2; exit 2 ;;
	esac
done

missing=()
for p in "${want[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "deps.sh: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null
	apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go: the machine image ships it in /usr/local/go. Without it, take Debian's
# newest Go from bookworm-backports; GOTOOLCHAIN=auto then fetches the exact
# toolchain go.mod asks for through the Go module proxy.
if ! command -v go >/dev/null && [ ! -x /usr/local/go/bin/go ]; then
	echo "deps.sh: installing Go"
	if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
		echo "deb http://deb.debian.org/debian bookworm-backports main contrib" >/etc/apt/sources.list.d/strata-backports.list
		apt-get update -q >/dev/null
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports golang-go >/dev/null
fi

# nix-trixie: Debian trixie's Nix 2.26 next to bookworm's 2.8, unpacked under
# /var/cache/strata/nix-trixie (scripts/nix-trixie.sh; nothing installed).
if [ -n "${trixie:-}" ]; then
	"$(dirname "$0")/nix-trixie.sh" >/dev/null
fi
