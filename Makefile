# qsup -- two commands do all set-up on a fresh Debian 12 machine (as root):
#   make demo    boots the demo (see README.md)
#   make test    unit + integration tests on real qemu and a real guest
#
# Python dependencies are pinned by constraints.txt (every package, test tools included), used
# by the dev venv (`make venv`), by CI (through `make test`) and by `make install`.  Refresh it
# with `make constraints` (a throw-away venv resolves pyproject.toml afresh), run the tests,
# commit the diff.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := constraints.txt
# one package per line, so that additions merge cleanly
APT_PACKAGES := \
	qemu-system-x86 \
	qemu-utils \
	busybox-static \
	cpio \
	iproute2 \
	iputils-ping \
	openvswitch-switch \
	procps \
	kmod \
	gcc \
	libc6-dev \
	python3-venv \
	openssl \
	systemd
STAMP := build/.stamp
PIP_INSTALL := pip install -q --disable-pip-version-check -c $(CONSTRAINTS)

# `make install`: a venv of its own in PREFIX, `qsup` on the PATH, the unit, bash completion
PREFIX ?= /opt/qsup
BINDIR ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system
COMPLETIONDIR ?= /usr/share/bash-completion/completions
CONFDIR ?= /etc/qsup

include mk/guest.mk
include mk/cluster.mk

# promtool (the metrics tests run `promtool check metrics`) ships in Debian's `prometheus`
# package.  Installing that package would add a system user, eleven libjs-* dependencies and,
# on a systemd host, enable and start a Prometheus server on :9090.  So it is only downloaded
# and promtool (a self-contained Go binary) alone is unpacked under build/prometheus: nothing runs,
# nothing to uninstall.  The tests look in $PROMTOOL, then PATH, then PROMTOOL_BIN.
PROMTOOL_DIR := build/prometheus
PROMTOOL_BIN := $(PROMTOOL_DIR)/usr/bin/promtool

# QEMU 10.0.2 from Debian's bookworm-backports (Debian 13 ships 10.0 itself), beside Debian 12's 7.2:
# QEMU 7.2's TCG loses guest writes between migration dirty-bitmap syncs (fixed upstream in 9.0,
# docs/ARCHITECTURE.md "Guest integrity"), so live migration under TCG needs it.  Only the three
# packages are downloaded and unpacked (apt-get install from backports would also upgrade mesa and
# libdrm): under /usr/local, so the qemu_chroot jail (which binds /usr) holds it too.  It reads its
# firmware from /usr/share/qemu, i.e. 7.2's package data: the same ROMs on both, which keeps guests
# migratable between the two.  QEMU10 is what the integration tests run (QSUP_TEST_QEMU overrides).
QEMU10_DIR := /usr/local/lib/qsup-qemu-10.0
QEMU10 := $(QEMU10_DIR)/usr/bin/qemu-system-x86_64
QEMU10_VERSION := 1:10.0.2+ds-2+deb13u1~bpo12+1
BACKPORTS_LIST := /etc/apt/sources.list.d/qsup-bookworm-backports.sources

.PHONY: deps apt venv promtool qemu10 lint test unit integration demo bench clean install uninstall constraints

deps: apt venv cluster-deps promtool qemu10

qemu10: $(QEMU10)
$(QEMU10): | $(STAMP)/apt
	test -e $(BACKPORTS_LIST) || printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' \
		'Suites: bookworm-backports' 'Components: main' \
		'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' > $(BACKPORTS_LIST)
	apt-get update -qq
	rm -rf build/qemu10-deb && mkdir -p build/qemu10-deb
	cd build/qemu10-deb && apt-get -o APT::Sandbox::User=root -qq download \
		'qemu-system-x86=$(QEMU10_VERSION)' 'qemu-system-common=$(QEMU10_VERSION)' 'qemu-system-data=$(QEMU10_VERSION)'
	rm -rf $(QEMU10_DIR).tmp && mkdir -p $(QEMU10_DIR).tmp
	for d in build/qemu10-deb/*.deb; do dpkg-deb -x $$d $(QEMU10_DIR).tmp || exit 1; done
	rm -rf $(QEMU10_DIR) && mv $(QEMU10_DIR).tmp $(QEMU10_DIR) && rm -rf build/qemu10-deb
	$@ --version | grep -q 'version 10\.0\.2' || { echo "qemu10: $@ does not run" >&2; exit 1; }
	touch $@

promtool: $(PROMTOOL_BIN)
$(PROMTOOL_BIN): | $(STAMP)/apt
	rm -rf $(PROMTOOL_DIR) && mkdir -p $(PROMTOOL_DIR)/deb
	cd $(PROMTOOL_DIR)/deb && apt-get -o DPkg::Lock::Timeout=600 -o APT::Sandbox::User=root -qq download prometheus
	dpkg-deb --fsys-tarfile $(PROMTOOL_DIR)/deb/prometheus_*.deb | tar -x -C $(PROMTOOL_DIR) ./usr/bin/promtool
	rm -rf $(PROMTOOL_DIR)/deb
	$@ --version >/dev/null
	touch $@

apt: $(STAMP)/apt
$(STAMP)/apt: Makefile
	mkdir -p $(STAMP)
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
		$(APT_PACKAGES) >/dev/null
	touch $@

venv: $(STAMP)/venv
$(STAMP)/venv: pyproject.toml $(CONSTRAINTS)
	mkdir -p $(STAMP)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip >/dev/null
	$(BIN)/$(PIP_INSTALL) -e '.[test]' --config-settings editable_mode=compat
	touch $@

# Resolve pyproject.toml's ranges afresh (newest releases) in a throw-away venv and pin the
# result.  Then: make venv && make test, and commit constraints.txt.
constraints:
	rm -rf build/constraints-venv
	$(PY) -m venv build/constraints-venv
	build/constraints-venv/bin/pip install -q --disable-pip-version-check --upgrade pip >/dev/null
	build/constraints-venv/bin/pip install -q --disable-pip-version-check '.[test]'
	{ echo "# Pinned dependencies of qsup (all extras). Generated by 'make constraints' from pyproject.toml"; \
	  echo "# with $$(build/constraints-venv/bin/python -V); do not edit by hand."; \
	  build/constraints-venv/bin/pip freeze --disable-pip-version-check --exclude-editable | grep -iv '^qsup[= @]'; \
	} > $(CONSTRAINTS)
	rm -rf build/constraints-venv build/lib build/bdist.*

# Install on a node: $(PREFIX) is a venv holding qsup and its pinned dependencies (not the
# source tree: the checkout can go away); $(BINDIR)/qsup links to it; the unit's ExecStart is
# $(PREFIX)/bin/qsup.  Re-running upgrades in place.  `systemctl daemon-reload` when systemd
# runs; enabling and starting is left to the operator.
install: apt
	test -x $(PREFIX)/bin/python || $(PY) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q --disable-pip-version-check --upgrade pip >/dev/null
	rm -rf build/wheel && mkdir -p build/wheel
	$(PREFIX)/bin/pip wheel -q --disable-pip-version-check --no-deps -w build/wheel .
	$(PREFIX)/bin/$(PIP_INSTALL) --force-reinstall --no-deps build/wheel/qsup-*.whl
	$(PREFIX)/bin/$(PIP_INSTALL) build/wheel/qsup-*.whl
	rm -rf build/wheel build/lib build/bdist.*
	install -d $(BINDIR) $(UNITDIR) $(COMPLETIONDIR)
	install -d -m 0755 $(CONFDIR)
	ln -sfn $(PREFIX)/bin/qsup $(BINDIR)/qsup
	sed 's#^ExecStart=/opt/qsup/bin/qsup #ExecStart=$(PREFIX)/bin/qsup #' contrib/qsup.service > $(UNITDIR)/qsup.service
	chmod 0644 $(UNITDIR)/qsup.service
	_QSUP_COMPLETE=bash_source $(PREFIX)/bin/qsup > $(COMPLETIONDIR)/qsup
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed: $(PREFIX) (venv), $(BINDIR)/qsup, $(UNITDIR)/qsup.service, $(COMPLETIONDIR)/qsup"
	@echo "next: write $(CONFDIR)/qsup.toml, then: systemctl enable --now qsup"

# Removes what `make install` made; $(CONFDIR) (your config) and the state dir stay.
uninstall:
	if [ -d /run/systemd/system ] && systemctl is-active -q qsup; then systemctl stop qsup; fi
	rm -f $(UNITDIR)/qsup.service $(COMPLETIONDIR)/qsup
	if [ "$$(readlink $(BINDIR)/qsup)" = "$(PREFIX)/bin/qsup" ]; then rm -f $(BINDIR)/qsup; fi
	rm -rf $(PREFIX)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# ruff (pyflakes, import order, pycodestyle, the rules the code's `# noqa` comments cite) over all
# the Python in the tree, then mypy over supervisor/, netconf/ and qmp_glue/.  Both are configured
# in pyproject.toml and pinned in constraints.txt.  `make test` runs this first.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests

integration: deps guest
	$(BIN)/pytest -q integration -m integration

# Lint first (right after deps, before the guest build): a finding fails `make test` before any
# pytest session.  tests/ and integration/ then run as two pytest sessions: pytest imports test
# modules by their basename (no packages, "prepend" import mode) and the two trees share basenames
# (test_console.py), which one session refuses to collect.  Both sessions always run; the
# target fails if either does (pytest exits 5 when it collected nothing, which fails too).
# JUNIT_DIR (.ci/run sets it): each session also writes its JUnit report there.
junit = $(if $(JUNIT_DIR),--junitxml=$(JUNIT_DIR)/$(1).xml)
test: deps lint guest
	@rc=0; \
	echo "== pytest tests"; $(BIN)/pytest -q tests $(call junit,tests) || rc=$$?; \
	echo "== pytest integration"; $(BIN)/pytest -q integration $(call junit,integration) || rc=$$?; \
	exit $$rc

demo: deps guest
	$(BIN)/python integration/demo.py

bench: deps guest
	for b in integration/bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf build $(VENV)
