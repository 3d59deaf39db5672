# writeboost — top-level entry points.
#
#   make demo    set up, build, create a writeboost device over image files,
#                run a 4 KiB random-write burst through it, print wbctl status
#                (natively when this kernel has ublk, else inside the QEMU VM)
#   make test    every test: setup (tests/vm/setup.sh), release build, then
#                cargo test --workspace --release (includes the VM tests)
#   make check   cargo fmt --check + clippy --all-targets -D warnings
#   make setup   only tests/vm/setup.sh (packages, VM kernel, initramfs)
#   make build   cargo build --release --workspace
#   make deb     the Debian package build/deb/writeboost_VERSION_ARCH.deb (wbctl, units,
#                man pages, completions, monitoring files; tools/debian/build-deb.sh)
#   make vm-smoke  the null-target smoke test in the VM (harness check)
#   make demo-iscsi  the README's iSCSI recipe for real, in the VM: the device
#                exported by LIO (targetcli), an initiator logged in over
#                127.0.0.1, fio and xfs on the LUN, a daemon crash and a stop
#                under it (always in the VM: it configures a target and an
#                initiator, which a demo must not do to this machine)
#
# Cargo's output goes to build/ (.cargo/config.toml: target/ is a crate).
# JOBS=N limits cargo's parallel jobs (default: cargo's own).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

REPO := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
CARGO ?= cargo
JOBS ?=
CARGO_JOBS := $(if $(JOBS),-j $(JOBS),)
BIN := $(REPO)/build/release
# Demo images live under the repo (never /tmp: the VM's /tmp is its own tmpfs).
DEMO_DIR := $(REPO)/.vm-cache/demo
DEMO_BACKING_SIZE ?= 2G
DEMO_CACHE_SIZE ?= 1G

.PHONY: help setup build test check deb demo demo-iscsi vm-smoke

help:
	@sed -n '3,21p' $(REPO)/Makefile | sed 's/^# \{0,1\}//'

setup:
	bash $(REPO)/tests/vm/setup.sh

build:
	$(CARGO) build --release --workspace $(CARGO_JOBS)

test: setup
	$(CARGO) build --release --workspace $(CARGO_JOBS)
	$(CARGO) test --workspace --release --no-fail-fast $(CARGO_JOBS)

# Only wbctl goes in the package; build/deb/ holds the result.
deb:
	$(CARGO) build --release -p wb-tools --bin wbctl $(CARGO_JOBS)
	bash $(REPO)/tools/debian/build-deb.sh --wbctl $(BIN)/wbctl --out $(REPO)/build/deb

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets $(CARGO_JOBS) -- -D warnings

vm-smoke: setup
	$(CARGO) build --release -p wb-tools --bin wb-null $(CARGO_JOBS)
	bash $(REPO)/tests/vm/run.sh --timeout 600 $(REPO)/tests/vm/scripts/null-smoke.sh 10

# Natively when /dev/ublk-control exists or `modprobe ublk_drv` works;
# otherwise in the VM with the backing image throttled like an HDD.
demo: setup build
	@mkdir -p $(DEMO_DIR)
	@rm -f $(DEMO_DIR)/backing.img $(DEMO_DIR)/cache0.img $(DEMO_DIR)/cache1.img
	truncate -s $(DEMO_BACKING_SIZE) $(DEMO_DIR)/backing.img
	truncate -s $(DEMO_CACHE_SIZE) $(DEMO_DIR)/cache0.img $(DEMO_DIR)/cache1.img
	@if [[ -e /dev/ublk-control ]] || modprobe ublk_drv 2>/dev/null; then \
		echo "demo: this kernel has ublk: running natively"; \
		bash $(REPO)/tests/vm/scripts/demo.sh $(DEMO_DIR)/backing.img \
			$(DEMO_DIR)/cache0.img $(DEMO_DIR)/cache1.img; \
	else \
		echo "demo: no ublk in this kernel ($$(uname -r)): running in the QEMU VM"; \
		bash $(REPO)/tests/vm/run.sh --timeout 900 \
			--disk $(DEMO_DIR)/backing.img:throttle \
			--disk $(DEMO_DIR)/cache0.img --disk $(DEMO_DIR)/cache1.img \
			$(REPO)/tests/vm/scripts/demo.sh; \
	fi

demo-iscsi: setup build
	@mkdir -p $(DEMO_DIR)
	@rm -f $(DEMO_DIR)/iscsi-backing.img $(DEMO_DIR)/iscsi-cache0.img $(DEMO_DIR)/iscsi-cache1.img
	truncate -s 1G $(DEMO_DIR)/iscsi-backing.img
	truncate -s 512M $(DEMO_DIR)/iscsi-cache0.img $(DEMO_DIR)/iscsi-cache1.img
	bash $(REPO)/tests/vm/run.sh --timeout 1200 \
		--disk $(DEMO_DIR)/iscsi-backing.img --disk $(DEMO_DIR)/iscsi-cache0.img \
		--disk $(DEMO_DIR)/iscsi-cache1.img $(REPO)/tests/vm/scripts/client-iscsi.sh
