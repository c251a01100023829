# `sudo make demo` and `sudo make test` work on a fresh Debian machine and are safe to rerun.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := iproute2 iptables nftables libnftables1 containernetworking-plugins \
                curl wrk nginx-light procps python3-venv python3-dev gcc \
                nghttp2-client nghttp2-server prometheus apache2-utils openssl tcpdump \
                clang llvm libbpf-dev libbpf1 bpftool linux-libc-dev \
                libclang-rt-dev

.PHONY: deps venv bpf test unit netns demo bench bench-quick lint clean

deps:  ## Debian packages: the real CNI plugins, netfilter tools, load generators
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@# kubectl (apply --dry-run=client of deploy/): any one will do; Debian's package if none
	@command -v kubectl >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null; }

venv: $(VENV)/.installed

# What `pip install` needs to build python-iptables (an sdist) on a fresh node, a Pi included:
# the venv module, Python headers and a C compiler. Installed when missing (as root).
VENV_BUILD_PACKAGES := python3-venv python3-dev gcc

# setup.py compiles csrc/ (agent.core._http1fast) into the editable install: a change there
# re-runs the install, which rebuilds it.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h)
	@missing=$$(for p in $(VENV_BUILD_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make venv needs: $$missing (run it with sudo, or apt-get install them)"; exit 1; fi; \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,fast]'
	touch $@

# eBPF capture programs, compiled ahead of time (no BTF, no kernel headers on the node).
BPF_OBJECTS := $(patsubst %.c,%.o,$(wildcard bpf/*.c))
BPF_CFLAGS   = -O2 -g -target bpf -Wall -Werror -I/usr/include/$(shell gcc -dumpmachine)

bpf: $(BPF_OBJECTS)

bpf/%.o: bpf/%.c
	clang $(BPF_CFLAGS) -c $< -o $@

lint: venv  ## ruff, and mypy --strict on the files pyproject.toml's [tool.mypy] names
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -q tests/unit

netns: deps venv bpf
	$(PY) -m pytest -q tests/netns

test: deps venv bpf lint
	$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/netns

demo: deps venv bpf
	$(PY) -m agent demo

bench: deps venv bpf  ## benchmarks (root, ~6 min): markdown on stdout, raw samples in JSON
	$(PY) bench/foundation.py --json bench-results.json | tee bench-results.md
	$(PY) bench/newconn.py | tee -a bench-results.md
	$(PY) bench/backends.py | tee -a bench-results.md

bench-quick: deps venv bpf  ## smoke run of the same (~1 min)
	$(PY) bench/foundation.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(BPF_OBJECTS)
