#!/usr/bin/env bash
# nix-trixie.sh makes Debian trixie's Nix (2.26) runnable on this Debian 12
# machine without installing it: it downloads trixie's nix-bin and the
# libraries it links (libc6 2.41 included) with a private apt configuration
# (the system's sources and dpkg database are not touched), unpacks them
# into a directory and writes wrappers that start Nix through trixie's own
# dynamic loader. Tests that compare Nix versions (2.8 from bookworm, 2.26
# from trixie) use it; the VM tier copies the same tree into guests.
#
# Usage: scripts/nix-trixie.sh [DIR]   (default /var/cache/strata/nix-trixie)
# Prints the wrappers' directory (DIR/bin). Idempotent: quick when present.
set -euo pipefail
dir=${1:-${STRATA_NIX_TRIXIE:-/var/cache/strata/nix-trixie}}
# A complete tree: the loader resolves every library of nix inside it.
if [ -x "$dir/bin/nix-store" ] && ! "$dir/root/usr/lib64/ld-linux-x86-64.so.2" --library-path "$dir/root/usr/lib/x86_64-linux-gnu" --list "$dir/root/usr/bin/nix" 2>&1 | grep "=>" | grep -qv " => $dir/root/"; then
	echo "$dir/bin"
	exit 0
fi
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9
apt="$dir/apt"
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/etc" "$dir/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" >"$apt/etc/sources.list"
opts=(-o "Dir::Etc::sourcelist=$apt/etc/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt/lists"
	-o "Dir::Cache=$apt/cache" -o Dir::State::status=/dev/null -o APT::Architecture=amd64 -o APT::Sandbox::User=root -q)
apt-get "${opts[@]}" update >/dev/null
# nix-bin and every library package in its dependency closure (perl and the
# tools it calls out to are not needed by nix-store/nix/nix-build).
pkgs=$(apt-cache "${opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
	--no-replaces --no-enhances nix-bin | grep -v '^ ' | grep -E '^(lib|zlib)' | grep -vE 'perl|:i386' | sort -u)
(cd "$dir/debs" && rm -f ./*.deb && apt-get "${opts[@]}" download nix-bin $pkgs >/dev/null)
rm -rf "$dir/root.tmp" && mkdir "$dir/root.tmp"
for d in "$dir"/debs/*.deb; do dpkg-deb -x "$d" "$dir/root.tmp"; done
rm -rf "$dir/root" && mv "$dir/root.tmp" "$dir/root"
mkdir -p "$dir/bin.tmp"
for t in nix nix-store nix-build nix-instantiate nix-env nix-hash nix-collect-garbage nix-daemon nix-shell; do
	cat >"$dir/bin.tmp/$t" <<WRAP
#!/bin/sh
# trixie's nix ($t), started by trixie's own loader and libraries.
r=\$(dirname "\$0")/../root
exec "\$r/usr/lib64/ld-linux-x86-64.so.2" --library-path "\$r/usr/lib/x86_64-linux-gnu:\$r/lib/x86_64-linux-gnu" --argv0 $t "\$r/usr/bin/nix" "\$@"
WRAP
	chmod 755 "$dir/bin.tmp/$t"
done
rm -rf "$dir/bin" && mv "$dir/bin.tmp" "$dir/bin"
outside=$("$dir/root/usr/lib64/ld-linux-x86-64.so.2" --library-path "$dir/root/usr/lib/x86_64-linux-gnu" \
	--list "$dir/root/usr/bin/nix" | grep "=>" | grep -v " => $dir/root/" || true)
if [ -n "$outside" ]; then
	echo "nix-trixie.sh: libraries not in trixie's tree:" >&2
	echo "$outside" >&2
	exit 1
fi
"$dir/bin/nix-store" --version >/dev/null
echo "$dir/bin"
