# strata — see README.md. Every target that needs packages installs them first
# (scripts/deps.sh), so a fresh Debian 12 machine needs nothing but root.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
export GOTOOLCHAIN ?= auto
GO ?= go
BIN := bin/strata

.PHONY: all build deps demo demo-host test unit integration test-vm test-deploy bench bench-nfs bench-builder bench-cluster bench-replica fuzz clean

all: build

deps:
	scripts/deps.sh base

build: deps
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN) ./cmd/strata

# demo: the whole story. A real server on a loop-backed btrfs store with
# real Nix paths, a builder in a qemu guest (the kernel's NFS client) that
# builds on generation 1 and rotates to generation 2.
demo: build
	scripts/deps.sh vm
	set -o pipefail; $(GO) test -v -count=1 -tags vm,demo -run '^TestDemo$$' -timeout 30m ./vm/ | grep -vE '^(=== RUN|--- PASS|PASS|ok )'

# demo-host: the server half only, no VM (a minute): publish, export, delta.
demo-host: build
	scripts/demo.sh

# test: every tier. Under CI=true nothing may skip (internal/testenv).
test: unit integration test-vm test-deploy

# unit: fast, no root. gofmt, vet, then the unit tests.
unit: deps
	@unformatted=$$(gofmt -l .); if [ -n "$$unformatted" ]; then echo "gofmt -l: not formatted: $$unformatted" >&2; exit 1; fi
	$(GO) vet ./...
	$(GO) test -count=1 ./...

# integration: root tier (loop btrfs, overlayfs, real nix-store, NFS over
# loopback, network namespaces).
# The ZFS conformance suite needs OpenZFS, which only the VM tier has: the
# host run leaves it to test-vm (STRATA_ZFS_IN_VM=1), which runs it in a guest.
integration: build
	scripts/deps.sh nix-trixie
	STRATA_ZFS_IN_VM=1 $(GO) test -count=1 -p 1 -tags integration -timeout 40m ./...

# test-vm: the VM tier (qemu, Debian's kernel, kernel NFS client, OpenZFS).
# -v: every suite prints what it checked ("CHECK ok: ...") and each guest's console.
test-vm: build
	scripts/deps.sh vm nix-trixie
	$(GO) test -v -count=1 -p 1 -tags vm -timeout 80m ./vm/...

# test-deploy: the Ansible roles applied for real (ansible-playbook over SSH)
# to systemd-nspawn containers booted from a cached mmdebstrap bookworm
# rootfs (/var/cache/strata/deploy), plus ansible-lint of the collection.
# -v: each ansible-playbook run's PLAY RECAP is printed.
test-deploy: build
	scripts/deps.sh deploy vm
	$(GO) test -v -count=1 -p 1 -tags deploy -timeout 40m ./deploy/...

# Benchmarks print tables comparing strata with a named peer in the same run.
bench: build
	$(GO) test -count=1 -tags integration -run '^$$' -bench . -benchtime 1x -timeout 30m ./bench/publish/

bench-nfs: build
	scripts/deps.sh bench
	$(GO) test -count=1 -tags integration -run '^$$' -bench . -benchtime 1x -timeout 40m ./bench/nfs/

# bench-builder: the builder in a VM (cold start vs nix copy, rotation), then
# the import of 100,000 and 1,000,000 path rows vs nix-store --load-db (host).
bench-builder: build
	scripts/deps.sh vm
	$(GO) test -count=1 -tags vm -run '^$$' -bench . -benchtime 1x -timeout 60m ./bench/builder/
	$(GO) test -count=1 -tags integration -run '^$$' -bench . -benchtime 1x -timeout 90m ./bench/import/

# bench-cluster: a new generation reaching 10, 50 and 200 gossip members
# (loopback sockets) vs polling at rotate.check_interval's default; gossip
# bytes at rest. Holds the machine-wide benchmark lock.
bench-cluster: build
	flock /tmp/strata-vm.lock $(GO) test -count=1 -tags integration -run '^$$' -bench . -benchtime 1x -timeout 30m ./bench/cluster/

# bench-replica: replicating a generation that adds 1,000 paths to a
# 100,000-path store to a replica server (btrfs send/receive through the
# API on the host; then zfs send/receive in a guest with OpenZFS) vs
# rsync -a --delete of the same change, same run. Under the machine-wide
# benchmark lock.
bench-replica: build
	scripts/deps.sh bench vm
	STRATA_ZFS_IN_VM=1 flock /tmp/strata-vm.lock $(GO) test -count=1 -tags integration -run '^$$' -bench . -benchtime 1x -timeout 60m ./bench/replica/
	flock /tmp/strata-vm.lock $(GO) test -count=1 -tags vm -run '^$$' -bench ReplicateZFSInVM -benchtime 1x -timeout 90m ./bench/replica/

# fuzz: a short run of every fuzz target.
fuzz: deps
	$(GO) test -run '^$$' -fuzz FuzzParseRegistration -fuzztime 30s ./nixstore/
	$(GO) test -run '^$$' -fuzz '^FuzzFastRow$$' -fuzztime 30s ./nixstore/
	$(GO) test -run '^$$' -fuzz FuzzRecord -fuzztime 30s ./server/nfs/guard/
	$(GO) test -run '^$$' -fuzz FuzzDecode -fuzztime 30s ./cluster/

clean:
	rm -rf bin
