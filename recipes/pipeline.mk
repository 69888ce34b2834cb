# The five stages as a make pipeline: `make -f recipes/pipeline.mk RECIPE=recipes/demo.yaml`.
# Each stage leaves a stamp in RUN/.make/ (inside the run directory: `runs/*` matches runs only, and
# deleting a run deletes its stamps, so make cannot believe a deleted run is done) when it succeeds, so
# make reruns only what is missing or stale, and a stage the recipe's method does not use (it says
# so and exits 0) is not retried. Every recipe in recipes/ works here, whatever its method.
# The run directory is named after the recipe's content hash: changing a recipe starts a new
# run (and a new privacy budget) instead of re-spending the old run's budget on stale stages.
# DPSYNTH defaults to the project's .venv/bin/dpsynth when it exists (no need to activate the venv),
# else to `dpsynth` on PATH.
PROJECT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))..)
DPSYNTH ?= $(or $(wildcard $(PROJECT)/.venv/bin/dpsynth),dpsynth)
RECIPE ?= recipes/demo.yaml
NAME ?= $(subst /,-,$(basename $(patsubst recipes/%,%,$(RECIPE))))
# Expanded once (:=): a recipe edited while the pipeline runs must not move later stages to another run.
ifndef RUN
RUN := runs/$(NAME)-$(shell sha256sum $(RECIPE) | cut -c1-8)
endif
STAMPS := $(RUN)/.make
# Stamps of the earlier layout (RUN.make/ beside the run) move into the run, once: without them make
# would rerun a finished run's stages, and every rerun spends privacy budget again.
ifneq ($(wildcard $(RUN).make),)
ifeq ($(wildcard $(STAMPS)),)
$(shell mkdir -p $(RUN) && mv $(RUN).make $(STAMPS))
endif
endif
D := $(DPSYNTH) --recipe $(RECIPE)

.PHONY: all ledger
all: $(STAMPS)/evaluate ledger
	@echo "samples: $(RUN)/samples.png   manifest: $(RUN)/manifest.yaml"

$(STAMPS)/select-public: $(RECIPE)
	$(D) select-public --run $(RUN)
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/pretrain: $(STAMPS)/select-public
	$(D) pretrain --run $(RUN)
	@touch $@

$(STAMPS)/finetune: $(STAMPS)/pretrain
	$(D) finetune --run $(RUN)
	@touch $@

$(STAMPS)/generate: $(STAMPS)/finetune
	$(D) generate --run $(RUN)
	@touch $@

$(STAMPS)/evaluate: $(STAMPS)/generate
	$(D) evaluate --run $(RUN)
	@touch $@

ledger: $(STAMPS)/evaluate
	$(DPSYNTH) ledger --run $(RUN) --rdp
