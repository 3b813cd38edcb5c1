# dmsnap developer entry points. Kernel work runs in a VM (tools/vm) unless
# the host has device-mapper and we are root; see tools/vm for the knobs.
#   make test ARGS='-k thin -x'   extra arguments go to pytest.

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
ARGS  ?=

.PHONY: all setup test test-host test-kernel test-service install demo lint bench bench-journal bench-scsi clean

all: test

setup:
	tools/setup

test: setup
	tools/run-tests -- $(ARGS)

test-host:
	tools/run-tests --host-only -- $(ARGS)

test-kernel:
	tools/run-tests --kernel-only --no-lint -- $(ARGS)

# dmsnap on this host as a service (docs/install.md), and that install
# proven under a real systemd in a Debian root booted in QEMU.
install: setup
	tools/install $(ARGS)

test-service: setup
	tools/service-test $(ARGS)

demo: setup
	tools/vm -- $(PY) -m dmsnap.demo

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@if command -v shellcheck >/dev/null; then \
		shellcheck tools/setup tools/vm tools/vm-guest-init tools/run-tests tools/torture tools/libiscsi-conformance tools/install tools/service-test tools/service-check .ci/run vagrant/provision.sh bench/read_engines.sh bench/run; \
	else echo "shellcheck not installed; skipped"; fi

# Benchmarks need the kernel too, so they run through tools/vm: all three
# (storage, journal, SCSI) in one boot, about 30 minutes.
#   make bench ARGS='--quick'
bench: setup
	tools/vm --timeout 5400 --memory 3G -- bench/run $(ARGS)

# The journal's benchmark alone (bench/README.md): one VM run of about 7 minutes.
#   make bench-journal ARGS='--quick'
bench-journal: setup
	tools/vm --timeout 900 --memory 3G -- $(PY) bench/journal_bench.py $(ARGS)

# The SCSI target's benchmark (bench/README.md): dmsnap's TCMU backstore vs
# LIO iblock, tcm_loop and iSCSI; one VM run of about 10 minutes.
#   make bench-scsi ARGS='--quick'
bench-scsi: setup
	tools/vm --timeout 1200 --memory 3G -- $(PY) bench/scsi_bench.py $(ARGS)

# Build and test leftovers only; .venv stays (rm -rf .venv to redo setup).
clean:
	rm -rf .vm-out .pytest_cache .ruff_cache .hypothesis build
	find dmsnap tests -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f dmsnap/dm/_dmffi.c dmsnap/storage/_loopffi.c dmsnap/_hotpath.c dmsnap/scsi/_sgffi.c
	find dmsnap -name '*.so' -delete
	rm -f $(VENV)/.dmsnap-setup-stamp
