# neuron-atlas — each stage is one script; each rule lists the script, its inputs and common/*.py,
# so editing one stage re-runs it and the stages after it, nothing before.
#   make all            set up .venv and run every stage on the offline demo (RUN=demo)
#   make test           set up .venv and run the test suite
#   make help           list targets and variables;  make -n all  shows what would run
# Variables (override on the command line: make all RUN=r50 MODEL=resnet50 WEIGHTS=r50.pth IMAGES=val/):

RUN         ?= demo#                       run name: outputs go to data/$(RUN)/
IMAGES      ?= data/demo_images/images.csv#  image folder (class sub-folders = labels) or CSV
MODEL       ?= efficientnet_lite0#         efficientnet_lite0, torchvision name, file.py:func, ckpt.pt
WEIGHTS     ?=#                            state-dict file for MODEL (empty: shipped / torchvision)
RANDOM_INIT ?= 0#                          1: allow an untrained network (random weights)
UNSAFE_PICKLE ?= 0#                        1: load a whole pickled checkpoint (trusted files only)
LAYERS      ?=#                            comma-separated layer names (empty: model default)
TOPK        ?= 100#                        top images kept per neuron
BATCH       ?= 32#                         images per forward pass
DEVICE      ?= auto#                       auto | cpu | cuda | cuda:N
GRID        ?= 10#                         mosaic tiles per side
TILE        ?= 64#                         mosaic tile side (px)
CROP        ?= rf#                         rf (receptive field) | mask (activation blob)
DEMO_N      ?= 1500#                       images in the offline demo probe set
WORKERS     ?= 2#                          decoding threads (01) and processes (02)
INPUT_SIZE  ?= 224#                        side of the square network input (px)
DATA        ?= data#                       folder holding the runs
PYTHON      ?= python3#                    interpreter used to create .venv

D       := $(DATA)/$(RUN)
VENV    := .venv/.installed
PY      := .venv/bin/python
COMMON  := $(wildcard common/*.py common/*.tsv)
comma   := ,

.DELETE_ON_ERROR:
.PHONY: all test bench help clean venv

# Per-stage arguments are written to data/$(RUN)/.args/NN only when they change, so that a new
# MODEL, LAYERS or GRID re-runs the stages it affects, and `make -q all` stays true otherwise.
ARGS_01 := --model $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
           $(if $(filter 1,$(RANDOM_INIT)),--random-init) \
           $(if $(filter 1,$(UNSAFE_PICKLE)),--unsafe-pickle) \
           $(if $(LAYERS),--layers $(LAYERS)) --topk $(TOPK) --batch-size $(BATCH) \
           --device $(DEVICE) --workers $(WORKERS) --input-size $(INPUT_SIZE)
ARGS_02 := --grid $(GRID) --tile $(TILE) --crop $(CROP) --workers $(WORKERS)
define track_args
$(shell mkdir -p $(D)/.args && { printf '%s\n' '$(strip $(2))' | cmp -s - $(D)/.args/$(1) || \
        printf '%s\n' '$(strip $(2))' > $(D)/.args/$(1); })
endef
ifeq ($(filter help test venv clean,$(MAKECMDGOALS)),)
$(call track_args,01,$(ARGS_01) --images $(IMAGES))
$(call track_args,02,$(ARGS_02))
endif

EXTRACT := $(D)/01_activations.npz
MOSAICS := $(D)/02_mosaics.csv

all: $(MOSAICS) ## run every stage on data/$(RUN)

help: ## list targets and variables
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort
	@echo; echo "Variables (default):"
	@grep -E '^[A-Z_]+ +\?=' $(MAKEFILE_LIST) | sed -E 's/ *\?= */ = /; s/# */\t# /'

venv: $(VENV) ## create .venv from requirements.txt
$(VENV): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: $(VENV) ## run the test suite (offline, CPU)
	$(PY) -m pytest -q tests

bench: $(VENV) ## benchmarks: print measured ratios against their targets
	$(PY) bench/bench_extract.py
	$(PY) bench/bench_mosaics.py

data/demo_images/images.csv: common/demo.py common/imagenet.py common/imagenet_classes.tsv | $(VENV)
	$(PY) -m common.demo data/demo_images --n-images $(DEMO_N) --seed 0

$(EXTRACT): 01_extract.py $(IMAGES) $(D)/.args/01 $(COMMON) | $(VENV)
	$(PY) 01_extract.py --images $(IMAGES) --out $(D) $(ARGS_01)

$(MOSAICS): 02_mosaics.py $(EXTRACT) $(D)/.args/02 $(COMMON) | $(VENV)
	$(PY) 02_mosaics.py --activations $(EXTRACT) --images $(D)/01_images.csv \
	    --out-dir $(D)/02_mosaics --index $@ $(ARGS_02)

clean: ## remove the outputs of data/$(RUN) except the (expensive) descriptions
	rm -rf $(D)/01_* $(D)/02_* $(D)/.args
