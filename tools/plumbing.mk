# Make's plumbing, included by the Makefile after its variables and before the stage rules: the
# checks of RUN/OTHER/DATA, the run folder's lock, the virtual environment, and the functions the
# stage rules use ($(call uses,…), $(call quote,…), $(HOLD)). Nothing here names a stage.

# RUN and OTHER name folders under DATA: plain names only, so that no recipe reaches outside
# $(DATA)/$(RUN) (`make clean RUN=..` would empty the project). The raw text is checked before
# make expands it. DATA may be any folder without blanks.
plain_chars := a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O \
               P Q R S T U V W X Y Z 0 1 2 3 4 5 6 7 8 9 . _ -
strip_chars = $(if $(2),$(call strip_chars,$(subst $(firstword $(2)),,$(1)),$(wordlist 2,$(words \
              $(2)),$(2))),$(1))
check_name = $(if $(or $(filter-out 1,$(words $(value $(1)))),$(filter .% -%,$(value $(1))),\
             $(call strip_chars,$(value $(1)),$(plain_chars))),$(error $(1)=$(value $(1)) is not \
             a plain name: use letters, digits, '.', '_' and '-', not starting with '.' or '-' \
             (it names the folder $(value DATA)/$(value $(1))/)))
$(call check_name,RUN)
$(if $(value OTHER),$(call check_name,OTHER))
$(if $(filter 1,$(words $(value DATA))),,$(error DATA=$(value DATA) must name one folder, without \
     blanks (it holds the runs; default: data)))

D       := $(DATA)/$(RUN)
VENV    := .venv/.installed
PY      := .venv/bin/python
comma   := ,
# $(call uses,NN_name.py) lists the common/ files the script imports, directly or through other
# modules, and the data files those read; tools/deps.py finds them in the sources (nothing is run).
DEPS    := $(shell $(PYTHON) -B -m tools.deps)
$(if $(DEPS),,$(error tools/deps.py printed nothing: is PYTHON=$(PYTHON) a Python 3?))
uses = $(sort $(foreach s,$(1),$(subst $(comma), ,$(patsubst $(s):%,%,$(filter $(s):%,$(DEPS))))))

.DELETE_ON_ERROR:

quote = '$(subst ','\'',$(1))'# single-quoted for the shell, inner ' escaped
DRY_RUN := $(findstring n,$(firstword -$(MAKEFLAGS)))
# One writer per run folder: this make holds data/$(RUN)/.make.lock until it exits (a second make
# on the same RUN stops with a message), and each stage holds .stage.lock while it runs (HOLD).
ifeq ($(filter help test venv mutants,$(MAKECMDGOALS))$(DRY_RUN),)
LOCKED := $(shell $(PYTHON) -m tools.runlock make $(call quote,$(D)) $$PPID)
$(if $(LOCKED),$(error $(LOCKED)))
endif
HOLD = $(PY) -m tools.runlock stage $(call quote,$(D)) --
DEMO_IMAGES := data/demo_images/images.csv
IS_DEMO     := $(if $(subst $(DEMO_IMAGES),,$(IMAGES)),,1)

venv: $(VENV) ## create .venv from requirements.txt
$(VENV): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Maintenance tools (`make mutants`), kept out of `make all`'s setup.
DEV_VENV := .venv/.installed-dev
$(DEV_VENV): requirements-dev.txt | $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(DEMO_IMAGES): tools/demo.py $(call uses,tools/demo.py) | $(VENV)
	$(PY) -m tools.demo data/demo_images --n-images $(DEMO_N) --seed 0
