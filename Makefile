# sslab: `make train` and `make test` each install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-data install-slurm install-stamps install-bench train test test-fast bench learning lint format

install: install-data
	$(PIP) install -q -e ".[dev]"

# Debian's full Fashion-MNIST (60k/10k); optional: without apt or root the embedded 10k/2k subset is used.
install-data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null; }; then \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null) \
	  || echo "note: could not install dataset-fashion-mnist; using the embedded subset"; \
	else echo "note: no apt/root; using the embedded Fashion-MNIST subset"; fi

# Debian's SLURM (slurmctld, slurmd, slurmdbd, munge, MariaDB) for the `slurm` tests, which start a real
# two-node cluster on loopback; optional: without apt or root those tests skip and say why.
SLURM_PKGS := slurmctld slurmd slurm-client munge slurmdbd mariadb-server
install-slurm:
	@if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SLURM_PKGS) >/dev/null) \
	  || echo "note: could not install the SLURM packages; the slurm tests will skip"; \
	else echo "note: no apt or not root; the slurm tests will skip"; fi

# Debian's tuxpaint stamps (object cut-outs + captions) and gnome backgrounds for the `stamps` dataset
# (data=stamps, CutLER / WSP pipelines); optional: without apt or root the stamps tests skip and say why.
STAMPS_PKGS := tuxpaint-stamps-default gnome-backgrounds
install-stamps:
	@if [ -d /usr/share/tuxpaint/stamps ] && [ -d /usr/share/backgrounds/gnome ]; then :; \
	elif command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || command -v sudo >/dev/null; }; then \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $(STAMPS_PKGS) >/dev/null) \
	  || echo "note: could not install $(STAMPS_PKGS); data=stamps and its tests are unavailable"; \
	else echo "note: no apt/root; data=stamps and its tests are unavailable"; fi

install-bench: install
	$(PIP) install -q -e ".[dev,bench]"

train: install
	$(PYTHON) train.py

# The suite on TEST_WORKERS pytest-xdist workers, each test file whole on one worker, so a module fixture (the
# SLURM cluster, a run shared by a file's tests) still starts once. One torch thread per worker: two workers
# with two threads each would ask 2 cores for 4. On 2 cores, 14.5 minutes instead of 32 (README, Tests).
# TEST_WORKERS=0 runs it in this process, serially.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: install install-slurm install-stamps
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

bench: install-bench
	$(PYTHON) bench/dino_step.py
	$(PYTHON) bench/knn_eval.py
	$(PYTHON) bench/views.py
	$(PYTHON) bench/mae_step.py
	$(PYTHON) bench/ddp_scaling.py
	$(PYTHON) bench/maskcut.py

# Every method and its lightly twin at one budget on Fashion-MNIST (k-NN, linear probe, images/s). 13 runs per
# seed, each capped at --budget-min 15: at most ~3.5 h per seed on 2 CPU cores. ARGS="--methods dino,mae --seeds 0,1".
learning: install-bench
	$(PYTHON) bench/learning.py $(ARGS)

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .
