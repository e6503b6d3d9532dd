# strata — see README.md. Every target that needs packages installs them first
# (scripts/deps.sh), so a fresh Debian 12 machine needs nothing but root.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
export GOTOOLCHAIN ?= auto
GO ?= go
BIN := bin/strata

.PHONY: all build deps demo test unit integration test-vm bench bench-nfs bench-builder fuzz lint clean

all: build

deps:
	scripts/deps.sh base

build: deps
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN) ./cmd/strata

# demo: a real server on a loop-backed btrfs store with real Nix paths.
demo: build
	scripts/demo.sh

# test: every tier. Under CI=true nothing may skip (internal/testenv).
test: unit integration test-vm

# unit: fast, no root.
unit: deps
	$(GO) vet ./...
	$(GO) test -count=1 ./...

# integration: root tier (loop btrfs, overlayfs, real nix-store, NFS over
# loopback, network namespaces).
integration: build
	$(GO) test -count=1 -p 1 -tags integration -timeout 30m ./...

# test-vm: the VM tier (qemu, Debian's kernel, kernel NFS client, OpenZFS).
test-vm: build
	scripts/deps.sh vm
	@echo "test-vm: VM tier not built yet"

bench: build
	scripts/deps.sh bench
	$(GO) test -tags integration -run '^$$' -bench . -benchtime 1x ./bench/...

clean:
	rm -rf bin
