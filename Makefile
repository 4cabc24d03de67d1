# qsup -- two commands do all set-up on a fresh Debian 12 machine (as root):
#   make demo    boots the demo (see README.md)
#   make test    unit + integration tests on real qemu and a real guest
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := qemu-system-x86 busybox-static cpio iproute2 iputils-ping openvswitch-switch procps kmod python3-venv
STAMP := build/.stamp

include mk/guest.mk

.PHONY: deps apt venv test unit integration demo bench clean

deps: apt venv

apt: $(STAMP)/apt
$(STAMP)/apt:
	mkdir -p $(STAMP)
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null
	touch $@

venv: $(STAMP)/venv
$(STAMP)/venv: pyproject.toml
	mkdir -p $(STAMP)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

unit: venv
	$(BIN)/pytest -q tests

integration: deps guest
	$(BIN)/pytest -q integration -m integration

test: deps guest
	$(BIN)/pytest -q tests integration

demo: deps guest
	$(BIN)/python integration/demo.py

bench: deps guest
	for b in integration/bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf build $(VENV)
