# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DPSYNTH := $(VENV)/bin/dpsynth
# torch/torchvision pinned to the builds this workplace serves from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Test workers (pytest-xdist), one torch thread each; whole files go to one worker (module fixtures run once).
TEST_WORKERS ?= 2

.PHONY: install data demo test bench bench-small bench-leaderboard clean

install: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST offline: Debian's dataset-fashion-mnist when we can install it (root),
# otherwise torchvision's normal download; then unpacked into the data root.
data: $(STAMP)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || true; fi
	$(PY) -m dpsynth.data.provision fashionmnist

demo: install
	$(MAKE) --no-print-directory -f recipes/pipeline.mk DPSYNTH=$(abspath $(DPSYNTH)) RECIPE=recipes/demo.yaml

test: install
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(PY) benchmarks/dp_step.py

# Every registered method's small recipe at eps 1 and 10 beside DPImageBench's published rows, one
# protocol for all (DP-safe selection, the CNN); it resumes, so it can be run in parts (LEADERBOARD_ARGS,
# e.g. --methods dp-merf,dp-ntk). The measured rows are committed (docs/leaderboard-rows.json), so it
# skips them: LEADERBOARD_ARGS=--fresh reruns them. The table goes to docs/leaderboard.md (its notes kept).
LEADERBOARD_ARGS ?=
bench-leaderboard: install
	$(PY) benchmarks/leaderboard.py --dpsynth $(abspath $(DPSYNTH)) --rows docs/leaderboard-rows.json \
		--out docs/leaderboard.md $(LEADERBOARD_ARGS)

# The GAN and mean-embedding rows only (about 13 minutes on an idle 2-core machine, 2026-12-05).
bench-small: install
	$(PY) benchmarks/leaderboard.py --dpsynth $(abspath $(DPSYNTH)) --methods dp-merf,dp-ntk,dp-kernel,dp-gan,gs-wgan,efsgd-gan

clean:
	rm -rf runs
