# The two commands of the course: `make test` and `make book`. Both bootstrap .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nclab-installed
# Models the chapters train are cached here, so `make book` reuses what `make test` trained.
export NCLAB_CACHE ?= $(CURDIR)/.nclab_cache
# Matplotlib's font list is built by this venv's matplotlib, not read from a shared ~/.cache: a
# font list written by another install (seen in CI: no STIX fonts) makes every log-scale axis print
# 21 "findfont" warnings into the built pages.
export MPLCONFIGDIR ?= $(CURDIR)/.mplconfig
# Per-cell limit for nbval: the slowest smoke cell took 27 s with an empty model cache on the
# 2-core CI machine (05_finetuning, pre-training); 300 s is 11x that, room for a shared machine
# running 5-10x slower, and a hung cell still fails within minutes.
CELL_TIMEOUT ?= 300
CHAPTERS := $(sort $(wildcard book/[0-9]*.ipynb))
# The instructors' solutions: left out of the book (_config.yml) and the wheel; a public copy has none.
SOLUTIONS := $(sort $(wildcard book/instructors/solutions/*_solution.ipynb))

.PHONY: all test book unit chapters rehearse lint install student clean-book clean

all: test book

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[book,test]"
	@if git rev-parse --git-dir >/dev/null 2>&1; then $(BIN)/nbstripout --install || true; fi
	@touch $@

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check nclab tests benchmarks book

# Tests and notebooks run TEST_JOBS at a time (pytest-xdist). Notebooks use --dist loadscope, which
# keeps each notebook's cells in order on one worker.
TEST_JOBS ?= 2

# Unit tests on CPU, offline. pytest's exit code 5 (nothing collected) is turned into an
# explicit failure: an empty run must never pass by accident.
unit: $(STAMP)
	@rc=0; HF_HUB_OFFLINE=1 NCLAB_PROFILE=smoke CUDA_VISIBLE_DEVICES= \
	  $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) tests || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no unit tests in tests/ -- failing"; exit 1; fi; \
	exit $$rc

# Every chapter under nbval (lax: all cells run, none compared) in the smoke profile.
chapters: $(STAMP)
	@if [ -z "$(strip $(CHAPTERS))" ]; then echo "make test: no chapters to validate"; exit 0; fi; \
	HF_HUB_OFFLINE=1 NCLAB_PROFILE=smoke CUDA_VISIBLE_DEVICES= \
	  $(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	  --nbval-cell-timeout=$(CELL_TIMEOUT) -n $(TEST_JOBS) --dist loadscope $(CHAPTERS)

test: lint unit chapters

# A rehearsal of the `course` profile on a CPU, offline (nclab.runtime.rehearsal): every chapter and
# assignment solution runs the course code under nbval with tiny sizes, stand-in data and random-init
# ImageNet/CLIP weights, which `nclab rehearsal-weights` writes into scratch torch hub / Hugging Face
# caches under $(REHEARSAL_DIR) (never the real ones). A course branch that breaks fails here.
REHEARSAL_DIR ?= $(CURDIR)/.rehearsal
# One intra-op thread per notebook, as two notebooks share the CPU (in a clean-clone run with torch's
# default of 2 threads each, chapter 02's across-model cell passed the 300 s cell timeout; with one it
# took 187 s. The whole rehearsal took about 15 min either way).
REHEARSAL_ENV := HF_HUB_OFFLINE=1 NCLAB_PROFILE=course NCLAB_REHEARSAL=1 CUDA_VISIBLE_DEVICES= \
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
  TORCH_HOME=$(REHEARSAL_DIR)/torch HF_HOME=$(REHEARSAL_DIR)/hf NCLAB_CACHE=$(REHEARSAL_DIR)/models
REHEARSED := $(CHAPTERS) $(if $(strip $(SOLUTIONS)),$(SOLUTIONS),$(wildcard book/assignments/*.ipynb))
rehearse: $(STAMP)
	$(REHEARSAL_ENV) $(BIN)/nclab rehearsal-weights
	$(REHEARSAL_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	  --nbval-cell-timeout=$(CELL_TIMEOUT) -n $(TEST_JOBS) --dist loadscope --durations=10 \
	  --junitxml=$(REHEARSAL_DIR)/rehearsal.xml $(REHEARSED)
	@echo "rehearsal: seconds per notebook (its cells summed; one worker runs each notebook)"
	@$(BIN)/python .ci/junit_times.py $(REHEARSAL_DIR)/rehearsal.xml

# Executes every chapter in the active profile (NCLAB_PROFILE; default course with CUDA, else
# smoke) and builds the HTML. A notebook error or any Sphinx warning fails the build.
# BOOK_JOBS>1: book/_ext/execute_book.py runs N notebooks at once (one intra-op thread each) into a fresh
# cache; the build only reads it.
BOOK_JOBS ?= 1
book: $(STAMP)
ifeq ($(filter-out 0 1,$(BOOK_JOBS)),)
	$(BIN)/jupyter-book build . --builder html -W --keep-going
else
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python book/_ext/execute_book.py --jobs $(BOOK_JOBS) --cache _build/.jupyter_cache_parallel \
	  --config-out _build/_config_parallel.yml
	$(BIN)/jupyter-book build . --builder html -W --keep-going --all --config _build/_config_parallel.yml
endif
	@test -f _build/html/index.html && echo "book: _build/html/index.html"

# Regenerate the student versions of the assignments (book/assignments/) from their solutions
# (deterministic), then check them (in sync, no solution code, no solution notebook elsewhere).
student: $(STAMP)
	@if [ -z "$(strip $(SOLUTIONS))" ]; then echo "make student: no solutions in" \
	  "book/instructors/solutions/ (a public copy has none; see book/assignments/instructors.md)"; \
	  exit 1; fi
	$(BIN)/nclab make-student $(SOLUTIONS)
	$(BIN)/nclab check-assignments book/instructors/solutions

clean-book:
	rm -rf _build

clean: clean-book
	rm -rf $(VENV) .nclab_cache
