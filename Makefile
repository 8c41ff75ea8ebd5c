# Two commands: `make demo` (sets up, then runs the main job) and `make test` (sets up, then runs the tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moekit-installed

.PHONY: demo test bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-cpu.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-cpu.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

DEMO_RUN := demo-$(shell date +%Y%m%d-%H%M%S)

# The main job: train the built-in MoE LM on the standard library's source (about 5 minutes on 2 cores),
# then write the routing report of the run.
demo: $(STAMP)
	$(PY) -m moekit train --name $(DEMO_RUN)
	$(PY) -m moekit report runs/$(DEMO_RUN)

test: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -m moekit bench

clean:
	rm -rf $(VENV) build src/*.egg-info
