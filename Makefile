# make demo   SFT → DPO → β-DPO on the embedded tiny model and the synthetic task (CPU, no downloads)
# make test   the test suite (creates .venv and installs the requirements on first use)
# make bench  training-step speed and memory against TRL's DPOTrainer (creates .venv-bench with TRL; ~25 min on 2 cores)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest tests -q

BENCH_VENV ?= .venv-bench

$(BENCH_VENV)/.installed: requirements.txt benchmarks/requirements-bench.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --disable-pip-version-check -r benchmarks/requirements-bench.txt
	touch $@

bench: $(VENV)/.installed $(BENCH_VENV)/.installed
	$(PY) benchmarks/bench_step.py --trl-python $(BENCH_VENV)/bin/python --out benchmarks/results.md

clean-venv:
	rm -rf $(VENV)
