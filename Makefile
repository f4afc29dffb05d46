# plvmctl: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
RECIPE ?= pocket
TESTSET ?= runs/toy-testset
METHODS ?= plvm,llava-text,llava-none
EVAL_OUT ?= runs/eval-$(RECIPE)
# On the toy set, 30 sampled negatives per identity keep `make eval` to minutes on a CPU.
EVAL_ARGS ?= $(if $(filter runs/toy-testset,$(TESTSET)),--neg-per-identity 30)
# One torch thread is faster than two for the pocket model's small matrices.
EVAL_ENV ?= $(if $(filter pocket,$(RECIPE)),OMP_NUM_THREADS=1)

.PHONY: install test test-slow demo eval bench pocket pocket-aligner pocket-smoke results clean

# torch is pinned first: that exact version takes the local CPU wheel instead of a CUDA build.
install:
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev,serve]"

# The default test run: fast unit and integration tests on tiny models (minutes, CPU only).
test: install
	$(PYTHON) -m pytest

# Slow end-to-end tests (training pipelines): their own target.
test-slow: install
	$(PYTHON) -m pytest -m slow

# The main job, offline: the pocket model encodes references and answers questions.
demo: install
	$(PYTHON) -m plvmctl.lab.demo

# The paper's protocol. Default: pocket model on a toy test set of held-out identities.
#   make eval TESTSET=../shared/testsets/plvm-val RECIPE=llava15-7b   (real model, GPU)
$(TESTSET)/validation_recognition:
	plvmctl toy testset --out $(TESTSET) --identities 40 --seed 0 --force

eval: install $(if $(filter runs/toy-testset,$(TESTSET)),$(TESTSET)/validation_recognition)
	$(EVAL_ENV) plvmctl --recipe $(RECIPE) eval --testset $(TESTSET) --method $(METHODS) --out $(EVAL_OUT) $(EVAL_ARGS)

# docs/results.md: main table (every method) on 40 held-out toy identities, several people at
# once, concepts from several photos (PLVM and Yo'LLaVA on the same photos) and the w and k
# ablations, every number measured by the run (how long it took: the page's "How it was made";
# RESULTS_ARGS=--skip-ablations leaves out the four Aligner trainings, about 45 minutes).
# Reruns reuse runs/results (finished steps are skipped); RESULTS_ARGS adds options.
results: install
	OMP_NUM_THREADS=1 $(PYTHON) -m plvmctl.lab.results $(RESULTS_ARGS)

bench: install
	$(PYTHON) bench/ask.py --recipe tiny
	$(PYTHON) bench/ask.py --recipe pocket

# Retrain the whole pocket model (card.json's total_seconds says how long the committed one
# took on 2 CPU cores). Resumable: an interrupted build continues from runs/pocket-build
# (finished stages are reused, the base LVLM and the Aligner from their last checkpoint);
# delete that folder to start over.
POCKET_WORK ?= runs/pocket-build
pocket: install
	$(PYTHON) -m plvmctl.lab.pocket --out plvmctl/assets/pocket --work $(POCKET_WORK) --resume

# Only the Aligner again (its toy data and training; card.json's timings_seconds.aligner), on
# the committed base LVLM and encoder: for when only the profile's Aligner settings change.
pocket-aligner: install
	OMP_NUM_THREADS=1 $(PYTHON) -m plvmctl.lab.pocket --out plvmctl/assets/pocket --aligner-only --work runs/pocket-aligner --resume

pocket-smoke: install
	$(PYTHON) -m plvmctl.lab.pocket --out runs/pocket-smoke --smoke

clean:
	rm -rf runs .pytest_cache build *.egg-info
