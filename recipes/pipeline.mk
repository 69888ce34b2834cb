# The five stages as a make pipeline: `make -f recipes/pipeline.mk RECIPE=recipes/demo.yaml`.
# Each stage leaves a stamp (in RUN.make/, beside the run directory) when it succeeds, so make
# reruns only what is missing or stale, and a stage the recipe's method does not use (it says
# so and exits 0) is not retried. Every recipe in recipes/ works here, whatever its method.
# The run directory is named after the recipe's content hash: changing a recipe starts a new
# run (and a new privacy budget) instead of re-spending the old run's budget on stale stages.
DPSYNTH ?= dpsynth
RECIPE ?= recipes/demo.yaml
NAME ?= $(subst /,-,$(basename $(patsubst recipes/%,%,$(RECIPE))))
# Expanded once (:=): a recipe edited while the pipeline runs must not move later stages to another run.
ifndef RUN
RUN := runs/$(NAME)-$(shell sha256sum $(RECIPE) | cut -c1-8)
endif
STAMPS := $(RUN).make
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
