# `sudo make demo` and `sudo make test` work on a fresh Debian machine and are safe to rerun.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := iproute2 iptables nftables libnftables1 containernetworking-plugins \
                curl wrk nginx-light procps python3-venv python3-dev gcc libc6-dev \
                nghttp2-client nghttp2-server prometheus apache2-utils openssl tcpdump \
                libssl-dev clang llvm libbpf-dev libbpf1 bpftool linux-libc-dev libclang-rt-dev \
                podman mmdebstrap containerd runc chromium

.PHONY: deps venv bpf keeper cni fuzz-keeper fuzz-cni test unit netns demo bench bench-quick lint clean \
        image pause-image deps-arm64 test-arm64 smoke-arm64 overload-arm64 image-arm64 image-arm64-check

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
VENV_BUILD_PACKAGES := python3-venv python3-dev gcc libssl-dev

# setup.py compiles csrc/ (agent.core._http1fast, agent._arenas, agent.dataplane._tlsio, _podio) and, with mypyc, the tunnel framing, the
# counters, the relay and the tunnel shell into the editable install: a change to them or to
# an agent module they import (agent/core/compiled.py lists them all) re-runs the install,
# which rebuilds it (a build of other sources is never loaded).
COMPILED_SOURCES := $(shell python3 agent/core/compiled.py)
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h) $(COMPILED_SOURCES)
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

# The socket keeper in C (keeper/keeper.c; agent/inpod/keeper.py is its reference): a process
# that lives as long as the node, at a few hundred KiB instead of an interpreter's 8 MiB.
KEEPER_CFLAGS = -O2 -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -fstack-protector-strong

keeper: keeper/pinion-keeper

keeper/pinion-keeper: keeper/keeper.c keeper/keeper.h
	gcc $(KEEPER_CFLAGS) -o $@ keeper/keeper.c

# pinion-cni (cni/pinion-cni.c; cni/pinion_cni_reference.py is its reference): the plugin the
# container runtime runs for every pod, static so it needs nothing on the host (no python3).
CNI_CFLAGS = -O2 -Wall -Wextra -Werror -D_FORTIFY_SOURCE=2 -fstack-protector-strong -static
CNI_SOURCES := cni/pinion-cni.c cni/cnicore.c cni/cnijson.c
CNI_HEADERS := cni/cnicore.h cni/printable.h

cni: cni/pinion-cni

cni/pinion-cni: $(CNI_SOURCES) $(CNI_HEADERS)
	gcc $(CNI_CFLAGS) -o $@ $(CNI_SOURCES) -lm

FUZZ_SECONDS ?= 60
fuzz-cni:  ## libFuzzer (ASan, UBSan) on pinion-cni's config and agent-reply parsing, FUZZ_SECONDS long
	@mkdir -p /tmp/pinion-fuzz-cni/corpus && cp cni/corpus/* /tmp/pinion-fuzz-cni/corpus/
	clang -g -O1 -fsanitize=fuzzer,address,undefined cni/fuzz.c cni/cnicore.c cni/cnijson.c -lm \
	  -o /tmp/pinion-fuzz-cni/fuzz
	/tmp/pinion-fuzz-cni/fuzz -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	  /tmp/pinion-fuzz-cni/corpus

fuzz-keeper:  ## libFuzzer (ASan, UBSan) on the keeper's request handling, FUZZ_SECONDS long
	@mkdir -p /tmp/pinion-fuzz-keeper/corpus && cp keeper/corpus/* /tmp/pinion-fuzz-keeper/corpus/
	clang -g -O1 -fsanitize=fuzzer,address,undefined -DKEEPER_FUZZING keeper/fuzz.c keeper/keeper.c \
	  -o /tmp/pinion-fuzz-keeper/fuzz
	/tmp/pinion-fuzz-keeper/fuzz -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	  /tmp/pinion-fuzz-keeper/corpus

lint: venv  ## ruff, and mypy --strict on the files pyproject.toml's [tool.mypy] names
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

unit: venv keeper cni
	$(PY) -m pytest -q tests/unit

netns: deps venv bpf keeper cni image pause-image
	$(PY) -m pytest -q tests/netns

test: deps venv bpf keeper cni lint image pause-image
	$(PY) -m pytest -q -p no:cacheprovider tests/unit tests/netns

demo: deps venv bpf keeper cni
	$(PY) -m agent demo

bench: deps venv bpf cni  ## benchmarks (root, ~6 min): markdown on stdout, raw samples in JSON
	$(PY) bench/foundation.py --json bench-results.json | tee bench-results.md
	$(PY) bench/newconn.py | tee -a bench-results.md
	$(PY) bench/backends.py | tee -a bench-results.md

bench-quick: deps venv bpf cni  ## smoke run of the same (~1 min)
	$(PY) bench/foundation.py --quick

# ---------------------------------------------------------------- the image, without a registry
# `make image` (root): the base debian:bookworm-slim made from Debian's archive by mmdebstrap
# (deploy/image/mkbase; the tarball is cached in IMAGE_CACHE, remade when missing or when
# mkbase changes: delete it for newer security updates), imported into podman under that
# name, then deploy/Dockerfile built with podman, tagged $(IMAGE). ARCH=arm64 builds for a
# Pi (an arm64 machine, or qemu-user-static + binfmt for emulation: docs/arm64.md).
#
# One tag per architecture, never one name for two: the host's own architecture keeps the
# plain names (localhost/pinion:dev is what tests/netns/test_containerd.py imports into this
# host's containerd), another one gets a suffix (localhost/pinion:dev-arm64 and
# localhost/pause:3.9-arm64, the pinion image's base
# localhost/debian:bookworm-slim-arm64, substituted for the Dockerfile's `FROM
# debian:bookworm-slim` with --build-context). So an arm64 build never re-imports or retags
# what an amd64 `make image` (here or in a parallel run) builds on. A manifest list joining
# the two is for a registry push (README: docker buildx), which this target does not do.
HOST_ARCH   := $(shell dpkg --print-architecture)
ARCH        ?= $(HOST_ARCH)
FOREIGN     := $(filter-out $(HOST_ARCH),$(ARCH))
IMAGE       ?= localhost/pinion:dev$(if $(FOREIGN),-$(ARCH))
PAUSE_IMAGE ?= localhost/pause:3.9$(if $(FOREIGN),-$(ARCH))
IMAGE_CACHE ?= /var/cache/pinion
BASE_IMAGE  := $(if $(FOREIGN),localhost/debian:bookworm-slim-$(ARCH),docker.io/library/debian:bookworm-slim)
BASE_CONTEXT := $(if $(FOREIGN),--build-context debian:bookworm-slim=docker-image://$(BASE_IMAGE))
# Named by mkbase's content, not compared by mtime: a fresh clone (CI) has a new mtime on
# every file and would remake the base, and with it every layer, each run.
BASE_TAR    := $(IMAGE_CACHE)/debian-bookworm-slim-$(ARCH)-$(shell sha256sum deploy/image/mkbase | cut -c1-12).tar
# pip in the build trusts what this machine trusts (a TLS-inspecting proxy's CA included).
HOST_CA     := /etc/ssl/certs/ca-certificates.crt
PIP_CA_ARGS := $(if $(wildcard $(HOST_CA)),--volume $(HOST_CA):/etc/pinion-build-ca.crt:ro --build-arg PIP_CERT=/etc/pinion-build-ca.crt)

image: deps $(BASE_TAR)
	@# Re-import only a changed tarball (a new import is a new base: every layer rebuilds), or
	@# when the name holds another ARCH's base (as an older Makefile could leave it).
	@if [ "$$(podman image inspect --format '{{.Architecture}}' $(BASE_IMAGE) 2>/dev/null)" != $(ARCH) ] \
	   || [ $(BASE_TAR) -nt $(BASE_TAR).imported ]; then \
	  echo "importing $(BASE_TAR) as $(BASE_IMAGE)"; \
	  podman import -q --arch $(ARCH) --change 'CMD ["bash"]' $(BASE_TAR) $(BASE_IMAGE) >/dev/null && \
	  touch $(BASE_TAR).imported; \
	fi
	podman build -q --pull=never --network host --platform linux/$(ARCH) $(PIP_CA_ARGS) $(BASE_CONTEXT) \
	  --label io.pinion.sources=$$(python3 deploy/image/sources-digest) \
	  -f deploy/Dockerfile -t $(IMAGE) . >/dev/null
	@podman image inspect --format '$(IMAGE): {{.Size}} bytes, linux/{{.Architecture}}' $(IMAGE)

$(BASE_TAR):
	mkdir -p $(IMAGE_CACHE)
	deploy/image/mkbase $(ARCH) $@ 2>$(IMAGE_CACHE)/mkbase-$(ARCH).log || \
	  { tail -20 $(IMAGE_CACHE)/mkbase-$(ARCH).log; exit 1; }

# The sandbox image containerd's CRI needs (k3s pulls rancher/mirrored-pause): one static
# binary, imported as an image of that file alone.
PAUSE_CC := $(if $(filter $(ARCH),$(shell dpkg --print-architecture)),gcc,$(shell dpkg-architecture -a$(ARCH) -qDEB_HOST_GNU_TYPE 2>/dev/null)-gcc)

pause-image: deps
	@set -e; dir=$$(mktemp -d); trap 'rm -rf $$dir' EXIT; \
	$(PAUSE_CC) -static -Os -s -Wall -Werror -o $$dir/pause deploy/image/pause.c; \
	tar -C $$dir -cf $$dir/pause.tar pause; \
	podman import -q --arch $(ARCH) --change 'ENTRYPOINT ["/pause"]' $$dir/pause.tar $(PAUSE_IMAGE) >/dev/null; \
	podman image inspect --format '$(PAUSE_IMAGE): {{.Size}} bytes' $(PAUSE_IMAGE)

# arm64 under emulation (docs/arm64.md): a cached Debian arm64 rootfs (mmdebstrap, qemu-user),
# the unit suite in it, and Debian's arm64 kernel booted under qemu-system-aarch64 for a netns
# smoke. Manual/weekly lanes, not part of `make test` (their cost is in docs/arm64.md).
ARM64_APT_PACKAGES := mmdebstrap qemu-user-static qemu-system-arm e2fsprogs

deps-arm64:
	@missing=$$(for p in $(ARM64_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

test-arm64: deps-arm64  ## the unit suite on arm64 under qemu-user (first run builds the rootfs)
	CI=$${CI:-true} tools/arm64/test.sh

smoke-arm64: deps-arm64  ## Debian's arm64 kernel under qemu-system-aarch64: netns smoke, console in docs/
	tools/arm64/smoke.sh

# bench/overload.py (issue #21) in that VM, the three capture modes in one boot, scaled to the
# emulated CPU (docs/arm64.md says why these numbers). The VM takes both host CPUs: it holds the
# host's benchmark lock while it runs, and a 40 min bound. Console in docs/arm64-overload.txt,
# the JSON and the table in build/arm64-overload/.
OVERLOAD_ARM64_ARGS ?= --pods 10 --then-pods 40 --cpu 0.3 --memory 48 --seconds 60 --capacity-requests 300
OVERLOAD_ARM64_RUN = set -o pipefail; python bench/overload.py $(OVERLOAD_ARM64_ARGS) \
	--json $$PINION_RESULT_DIR/overload.json | tee $$PINION_RESULT_DIR/overload.md
overload-arm64: deps-arm64  ## bench/overload.py on Debian's arm64 kernel (TCG), nftables/iptables/eBPF
	SMOKE_LOG=docs/arm64-overload.txt SMOKE_RESULTS=build/arm64-overload SMOKE_TIMEOUT=2400 \
	SMOKE_BOOT_LOCK=/tmp/pinion-bench.lock tools/arm64/smoke.sh --run '$(OVERLOAD_ARM64_RUN)'

# The image a Pi pulls, built here under qemu-user (every RUN of deploy/Dockerfile emulated,
# niced: ~10 min the first time here), tagged localhost/pinion:dev-arm64 beside the host's
# localhost/pinion:dev (see IMAGE above). The check runs it and asserts what docs/arm64.md says.
image-arm64: deps-arm64
	tools/arm64/binfmt.sh
	nice -n 15 ionice -c3 $(MAKE) --no-print-directory image ARCH=arm64

image-arm64-check: image-arm64  ## the arm64 image: linux/arm64, runs pinion, aarch64 inside, own tag
	tools/arm64/image-check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(BPF_OBJECTS) keeper/pinion-keeper cni/pinion-cni
