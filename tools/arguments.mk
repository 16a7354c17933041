# Make's plumbing, included at the end of the Makefile: each stage's arguments (ARGS_NN, set beside
# its rule) are written to data/$(RUN)/.args/NN only when they change, so that a new MODEL, LAYERS
# or GRID re-runs the stages it affects, and `make -q all` stays true otherwise.

# $(call track_args,NN,ARGS) prints NN when ARGS differ from the stored ones; outside a dry run
# (make -n) it also stores them, which makes stage NN and the stages after it out of date.
track_args = $(shell mkdir -p $(D)/.args && { printf '%s\n' $(call quote,$(strip $(2))) | \
        cmp -s - $(D)/.args/$(1) || { echo $(1); $(if $(DRY_RUN),:,printf '%s\n' \
        $(call quote,$(strip $(2))) > $(D)/.args/$(1)); }; })
# 01 also depends on the content of its inputs (common/fingerprint.py: every image's path, size
# and mtime, the model's files by content), stored in .args/01-inputs when it changes. The demo
# set is made by a rule, so make's own timestamps cover it.
ifeq ($(filter help test venv clean $(DEMO_IMAGES),$(MAKECMDGOALS)),)
INPUTS_01 := $(shell $(PYTHON) -m common.fingerprint --model=$(call quote,$(MODEL)) \
        $(if $(IS_DEMO),,--images=$(call quote,$(IMAGES))) \
        $(if $(WEIGHTS),--weights=$(call quote,$(WEIGHTS))) \
        $(if $(CLASSES),--classes=$(call quote,$(CLASSES))))
ifneq ($(.SHELLSTATUS),0)
$(error $(INPUTS_01))
endif
CHANGED := $(call track_args,01,$(ARGS_01) --images=$(call quote,$(IMAGES))) \
           $(call track_args,01-inputs,$(INPUTS_01)) $(call track_args,02,$(ARGS_02)) \
           $(call track_args,03,$(ARGS_03)) $(call track_args,04,$(ARGS_04)) \
           $(call track_args,05,$(ARGS_05)) $(call track_args,06,$(ARGS_06)) \
           $(call track_args,08,$(ARGS_08)) $(call track_args,09,$(ARGS_09)) \
           $(call track_args,10,$(ARGS_10))
# The arguments of the reports made on request are tracked by the make that makes them only, so
# that `make all` with other defaults leaves a report made with `make audit AUDIT=mine.yaml` as it is.
CHANGED += $(if $(filter baskets,$(MAKECMDGOALS)),$(call track_args,11,$(ARGS_11))) \
           $(if $(filter audit,$(MAKECMDGOALS)),$(call track_args,13,$(ARGS_13))) \
           $(if $(filter describe-compare,$(MAKECMDGOALS)),$(call track_args,14,$(ARGS_14))) \
           $(if $(filter label,$(MAKECMDGOALS)),$(call track_args,15,$(ARGS_15)))
endif
ifneq ($(DRY_RUN),)
# A dry run stores nothing, so it marks the stages whose arguments changed as out of date instead.
$(foreach n,$(CHANGED),$(eval $(D)/.args/$(n): .FORCE ; @# the arguments of stage $(n) changed))
.FORCE:
endif
