# Every target builds .venv by itself; a fresh clone needs nothing installed by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch as pinned here (a CPU build on these machines); for a GPU, the same version's CUDA build
# from its index (pyproject's torch==2.13.0 is then satisfied by 2.13.0+cu128):
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install native test lint serve simulate bench reliability clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is a CPU build on local disk.
	$(BIN)/pip install -q '$(TORCH)' $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) native

# The scheduler's hot path compiled with mypyc into build/native (about 40 s here; again only
# when its sources change). PROMPTSERVE_NATIVE=0 skips it and runs the Python.
native: $(STAMP)
	$(BIN)/python -c "from promptserve import native; raise SystemExit(native.main(['build']))"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks reliability
	$(BIN)/ruff format --check src tests benchmarks reliability

# Debian's Chromium and ChromeDriver for the browser tests (tests/test_browser.py). Installing
# needs root (CI has it); without them those tests are skipped, saying why.
CHROMEDRIVER := /usr/bin/chromedriver
$(CHROMEDRIVER):
	-apt-get install -y -q chromium chromium-driver >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null)

# Test files run in parallel, each whole in one worker (a module's fixtures, test_ray's one Ray
# cluster): most tests wait on a server or a modelled GPU, so 2 cores run about 1.6x as fast.
test: lint native $(CHROMEDRIVER)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -n auto --maxprocesses=4 --dist loadfile

# The embedded default: tiny model on the CPU, cache in ./.promptserve, 127.0.0.1:8000.
serve: $(STAMP) native
	HF_HUB_OFFLINE=1 $(BIN)/promptserve serve

# The Argus-shaped comparison (840 minutes compressed 10x, 8 GPUs): the published method as
# shipped and every rival with promptserve's queue and admission (the simulate defaults).
simulate: $(STAMP) native
	HF_HUB_OFFLINE=1 $(BIN)/promptserve simulate --arrivals argus --time-scale 10 --gpus 8 --feature-cache off --out out/simulate

bench: $(STAMP) native
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_planner.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_sim.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/sim_fingerprint.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_capacity.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_policies.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_selector.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_edits.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_batch.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_hindsight.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_bursts.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_sizes.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_feature_cache.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_step_decision.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_engine.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_size_steps.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_fewstep.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_http.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_request_path.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_ray.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_shards.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_cache.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_live_vs_sim.py

# Overload, faults, bad input and security against the real server (under 5 minutes); one JSON
# line of figures; fails on any lost, twice-answered, 5xx or torn-entry figure. Needs root for
# the full-disk tmpfs (else that stage reports itself skipped and the run fails).
reliability: $(STAMP) native
	HF_HUB_OFFLINE=1 $(BIN)/python -m reliability.run

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
