#!/usr/bin/env bash
# demo.sh: strata's main job on one machine, with real parts.
#  1. a loop-backed btrfs filesystem under $DEMO_DIR holds a central Nix store
#     (a btrfs subvolume with store/ and var/nix/db/), filled by nix-bin with
#     real store paths and a real build;
#  2. `strata server` publishes generation 1 and exports it over NFSv3;
#  3. a path is added to the central store; generation 2 is published and
#     the delta 1 -> 2 is shown.
# Run as root (make demo-host). Everything it makes is removed at exit
# (set SERVER_LOG outside DEMO_DIR to keep the server's log).
set -euo pipefail
cd "$(dirname "$0")/.."
STRATA=$PWD/bin/strata
DEMO_DIR=${DEMO_DIR:-$PWD/.demo}
SERVER_LOG=${SERVER_LOG:-$DEMO_DIR/server.log}
API=127.0.0.1:${DEMO_API_PORT:-17480}
NFS=127.0.0.1:${DEMO_NFS_PORT:-12049}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "demo: run as root (loop devices, btrfs, mounts)"; exit 1; }

cleanup() {
	set +e
	[ -n "${SERVER_PID:-}" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
	mountpoint -q "$DEMO_DIR/mnt" && umount -l "$DEMO_DIR/mnt"
	[ -n "${LOOP:-}" ] && losetup -d "$LOOP"
	rm -rf "$DEMO_DIR"
}
trap cleanup EXIT
cleanup; trap cleanup EXIT
mkdir -p "$DEMO_DIR/mnt"

step "1. a central Nix store on a loop-backed btrfs"
truncate -s 2G "$DEMO_DIR/btrfs.img"
mkfs.btrfs -q -f "$DEMO_DIR/btrfs.img"
LOOP=$(losetup --find --show "$DEMO_DIR/btrfs.img")
mount -t btrfs "$LOOP" "$DEMO_DIR/mnt"
btrfs -q subvolume create "$DEMO_DIR/mnt/nix"
ROOT=$DEMO_DIR/mnt          # chroot store: $ROOT/nix/store, $ROOT/nix/var/nix/db
NIXOPTS=(--store "$ROOT" --option build-users-group "" --option substituters "")
echo "btrfs on $LOOP, subvolume $ROOT/nix"

mkdir -p "$DEMO_DIR/src/hello/bin"
printf '#!/bin/sh\necho "hello from the central store"\n' >"$DEMO_DIR/src/hello/bin/hello"
chmod +x "$DEMO_DIR/src/hello/bin/hello"
HELLO=$(nix-store "${NIXOPTS[@]}" --add "$DEMO_DIR/src/hello")
echo "the demo data set, $(date -u)" >"$DEMO_DIR/src/dataset.txt"
DATA=$(nix-store "${NIXOPTS[@]}" --add "$DEMO_DIR/src/dataset.txt")
cat >"$DEMO_DIR/src/tool.nix" <<NIX
derivation {
  name = "demo-tool";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  hello = builtins.storePath "$HELLO";
  args = [ "-c" "mkdir -p \$out/bin; echo '#!/bin/sh' > \$out/bin/tool; echo \"exec \$hello/bin/hello\" >> \$out/bin/tool; chmod +x \$out/bin/tool" ];
}
NIX
TOOL=$(nix-build "${NIXOPTS[@]}" --no-out-link --option sandbox-paths "/bin/sh=$(readlink -f "$(command -v busybox)")" "$DEMO_DIR/src/tool.nix" 2>/dev/null)
echo "store paths: $HELLO"
echo "             $DATA"
echo "             $TOOL (built by nix-build; refers to hello)"

step "2. strata server: publish generation 1 and export it"
cat >"$DEMO_DIR/server.yaml" <<YAML
store:
  root: $ROOT/nix
  dir: /nix/store
snapshot:
  backend: btrfs
  snapshot_dir: $ROOT/snapshots
state_dir: $DEMO_DIR/state
publish:
  interval: 0s
retention:
  keep: 5
api:
  listen: $API
  token_file: ""
nfs:
  listen: $NFS
  allow: [127.0.0.0/8]
YAML
echo "config: $DEMO_DIR/server.yaml"
"$STRATA" server --config "$DEMO_DIR/server.yaml" --check-config
"$STRATA" server --config "$DEMO_DIR/server.yaml" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
export STRATA_API=unix:$DEMO_DIR/state/api.sock
for _ in $(seq 100); do [ -S "$DEMO_DIR/state/api.sock" ] && break; sleep 0.1; done
# The server publishes once at start.
for _ in $(seq 100); do "$STRATA" generations --json 2>/dev/null | grep -q '"id": 1' && break; sleep 0.1; done
"$STRATA" generations
echo
echo "generation 1 is a read-only btrfs snapshot:"
btrfs property get "$ROOT/snapshots/strata-1" ro
echo "registration (nix-store --dump-db format) of generation 1, from GET /v1/generations/1/registration:"
curl -sf "http://$API/v1/generations/1/registration" | head -n 12
echo "..."
NFSPORT=${NFS##*:}
NFSURL="version=3&nfsport=$NFSPORT&mountport=$NFSPORT&auto-traverse-mounts=0"
echo "the NFS export, read with libnfs (a third-party NFSv3 client): nfs-ls nfs://127.0.0.1/gen/1"
nfs-ls "nfs://127.0.0.1/gen/1?$NFSURL"
echo "nfs-cat nfs://127.0.0.1/gen/1/${TOOL#/nix/store/}/bin/tool:"
nfs-cat "nfs://127.0.0.1/gen/1/${TOOL#/nix/store/}/bin/tool?$NFSURL"

step "3. the central store changes; generation 2 and its delta"
echo "a new input" >"$DEMO_DIR/src/new-input.txt"
NEW=$(nix-store "${NIXOPTS[@]}" --add "$DEMO_DIR/src/new-input.txt")
echo "added $NEW"
"$STRATA" publish
echo "publishing again with no change:"
"$STRATA" publish
"$STRATA" generations
"$STRATA" delta 2 --from 1
echo
echo "generation 1 is untouched: $(ls "$ROOT/snapshots/strata-1/store" | wc -l) entries in its store, $(ls "$ROOT/nix/store" | wc -l) in the live store"
"$STRATA" pin 1 --name demo-golden
"$STRATA" status

step "done"
echo "server log: $(wc -l <"$SERVER_LOG") lines; last:"
tail -n 5 "$SERVER_LOG"
