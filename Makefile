# `make demo` and `make test` work on a fresh machine with Python 3 and make: they create .venv,
# install the package (torch pinned to the local CPU wheel), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck format bench bench-rl reliability clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev]" "$(TORCH_PIN)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RUN_DIR=$${RUN_DIR:-$(CURDIR)/runs} $(BIN)/ml train digits

lint: $(STAMP)
	$(BIN)/ruff check ml tests bench
	$(BIN)/ruff format --check ml tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck  # 2 workers (pytest-xdist); fault injection at small counts (6 kills, 5 signals, 50 fuzz examples per test); racing runs in `make reliability`
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 \
		--deselect tests/reliability/test_concurrency.py::test_fresh_runs_started_together_get_distinct_folders \
		--deselect tests/reliability/test_concurrency.py::test_of_continuations_released_together_exactly_one_trains

format: $(STAMP)
	$(BIN)/ruff format ml tests bench
	$(BIN)/ruff check --fix ml tests bench

bench: $(STAMP)  # every comparison, side by side with the peers; tables printed, JSON in bench/results/
	$(BIN)/python -m pip install --quiet -e ".[bench]" "$(TORCH_PIN)"
	$(BIN)/python bench/import_time.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/checkpoint.py
	$(BIN)/python bench/rl_cartpole.py
	$(BIN)/python bench/gpu_lm.py  # GPT-2 small on a GPU (a tiny smoke run without CUDA); scripts/gpu_check.sh runs it there

bench-rl: $(STAMP)  # ml vs Stable-Baselines3 PPO on CartPole, then PPO on Pendulum (several minutes)
	$(BIN)/python -m pip install --quiet -e ".[bench]" "$(TORCH_PIN)"
	$(BIN)/python bench/rl_cartpole.py
	$(BIN)/python bench/rl_pendulum.py

reliability: $(STAMP)  # fault injection at full counts: 200 kill -9, 100 SIGTERM/SIGUSR1, 64 racing runs, 1200 fuzz examples (about 17 minutes)
	ML_RELIABILITY_KILLS=200 ML_RELIABILITY_SIGNALS=100 ML_RELIABILITY_RACERS=64 ML_RELIABILITY_EXAMPLES=300 $(BIN)/python -m pytest -q -s tests/reliability

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
