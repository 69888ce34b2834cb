# The five stages as a make pipeline: `make -f recipes/pipeline.mk RECIPE=recipes/demo.yaml`.
# Each stage's artifact is a target, so make reruns only what is missing or stale.
# The run directory is named after the recipe's content hash: changing a recipe starts a new
# run (and a new privacy budget) instead of re-spending the old run's budget on stale stages.
DPSYNTH ?= dpsynth
RECIPE ?= recipes/demo.yaml
RUN ?= runs/$(basename $(notdir $(RECIPE)))-$(shell sha256sum $(RECIPE) | cut -c1-8)
D := $(DPSYNTH) --recipe $(RECIPE)

.PHONY: all ledger
all: $(RUN)/results.csv ledger
	@echo "samples: $(RUN)/samples.png   manifest: $(RUN)/manifest.yaml"

$(RUN)/selection.json: $(RECIPE)
	$(D) select-public --run $(RUN)

$(RUN)/pretrained.pt: $(RUN)/selection.json
	$(D) pretrain --run $(RUN)

$(RUN)/generator.pt: $(RUN)/pretrained.pt
	$(D) finetune --run $(RUN)

$(RUN)/synthetic.npz: $(RUN)/generator.pt
	$(D) generate --run $(RUN)

$(RUN)/results.csv: $(RUN)/synthetic.npz
	$(D) evaluate --run $(RUN)

ledger: $(RUN)/results.csv
	$(DPSYNTH) ledger --run $(RUN) --rdp
