# The README's two commands. Each does all set-up itself on a fresh machine.
#   make test   install into .venv, run the test suite
#   make demo   install into .venv, run the main end-to-end job
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.decmem-installed

.PHONY: setup sysdeps test demo bench clean gpu-wheels gpu-check

# Debian packages: headless rendering (MiniWorld over EGL, software GL) and a one-node SLURM for the tests
# of `decmem submit` (devtools/local_cluster.py starts it on localhost).
SYSDEPS := libegl1 libegl-mesa0 libgl1-mesa-dri slurmctld slurmd slurm-client munge
sysdeps:
	@if dpkg -s $(SYSDEPS) >/dev/null 2>&1; then echo "system packages present: $(SYSDEPS)"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS); \
	else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS); fi

setup: sysdeps $(STAMP)

# torch first, pinned to the local CPU wheel: an unpinned torch (or a package
# asking for one) would pull several GB of CUDA packages.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# DS_BUILD_OPS=0: DeepSpeed compiles no C++/CUDA op at install (the trainer needs none on CPU)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	touch $@

# ruff first (pyproject.toml [tool.ruff]: pyflakes, syntax, import order, pyupgrade), then the suite
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -q

# The main job: render -> shards -> train (DeepSpeed, dp=1 x cp=2) -> generate per strategy -> eval/report.
# Each stage is an ordinary `decmem` subcommand; a re-run reuses finished stages (see `decmem demo --help`).
demo: setup
	$(VENV)/bin/decmem demo --out runs/demo

bench: setup
	$(VENV)/bin/decmem bench attention -c configs/bench_cpu.yaml --bank-frames 8,32,128,448,512 \
		--repeats 15 --json runs/bench/attention_cpu.json

# The GPU check (devtools/gpu_check.py; README, "GPU check"). gpu-wheels runs here, with a registry: it builds
# DeepSpeed without ops and downloads the other packages the GPU machine lacks (for its Python 3.12) into wheels/,
# and fails over 60 MiB. gpu-check runs on the GPU machine, with that machine's python3 (torch + CUDA): it installs
# wheels/ offline, then writes GPU_CHECK_OUT; on a machine without CUDA it records every GPU step as skipped.
GPU_WHEELS ?= wheels
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= runs/gpu_check/gpu_check.json
GPU_CHECK_ARGS ?=
gpu-wheels: setup
	$(PY) -m devtools.gpu_wheels --out $(GPU_WHEELS) --python-version 3.12 --limit-mib 60

gpu-check:
	$(GPU_PYTHON) -m devtools.gpu_check --wheels $(GPU_WHEELS) --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis *.egg-info
