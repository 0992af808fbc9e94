# make demo   SFT → DPO → β-DPO on the embedded tiny model and the synthetic task (CPU, no downloads)
# make test   the test suite (creates .venv and installs the requirements on first use)
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

clean-venv:
	rm -rf $(VENV)
