#!/usr/bin/env bash
# rootfs.sh prints the path of a Debian bookworm root filesystem directory for
# the deploy tests (systemd-nspawn containers and the VM guest), building it
# with mmdebstrap when the cache has none for the current package versions.
# Cache: /var/cache/strata/deploy/rootfs-<key>/ (a directory), key = sha256 of this
# script's package list and the candidate version of each package in it.
set -euo pipefail
cache=${STRATA_DEPLOY_CACHE:-/var/cache/strata/deploy}
pkgs=(systemd-sysv openssh-server python3 python3-apt nfs-common iproute2 kmod udev dbus procps
	btrfs-progs nix-bin ca-certificates)
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9
key=$( { printf '%s\n' "${pkgs[@]}"; apt-cache show --no-all-versions "${pkgs[@]}" | grep -E '^(Package|Version):'; } | sha256sum | cut -c1-16)
out="$cache/rootfs-$key"
if [ ! -d "$out" ]; then
	rm -rf "$out.tmp"
	echo "rootfs.sh: building $out with mmdebstrap (a few minutes)" >&2
	inc=$(IFS=,; echo "${pkgs[*]}")
	mmdebstrap --variant=minbase --include="$inc" \
		--customize-hook='echo strata-deploy > "$1/etc/hostname"' \
		--customize-hook='rm -f "$1/etc/machine-id"; : > "$1/etc/machine-id"' \
		--format=directory bookworm "$out.tmp" http://deb.debian.org/debian >&2
	mv "$out.tmp" "$out"
	# Keep only the newest three.
	ls -dt "$cache"/rootfs-*[0-9a-f] | tail -n +4 | xargs -r rm -rf
fi
echo "$out"
