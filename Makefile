# neuron-atlas — the table of contents: the variables, then one section per stage in run order.
# Each stage is one script and a phony target named after it (`make mosaics`); its file rule lists
# the script, its inputs and the common/ files the script imports, so editing one stage or module
# re-runs the stages that use it and the stages after them, nothing before. Plumbing (locks,
# .venv, argument tracking) is in tools/plumbing.mk and tools/arguments.mk.
#   make all            set up .venv and run every stage on the offline demo (RUN=demo)
#   make test           set up .venv and run the test suite
#   make serve          browse data/$(RUN)/atlas with live search on http://$(HOST):$(PORT)/
#   make help           list targets and variables;  make -n all  shows what would run
# Variables (override on the command line: make all RUN=r50 MODEL=resnet50 WEIGHTS=r50.pth IMAGES=val/):

RUN         ?= demo#                       run name: outputs go to data/$(RUN)/
IMAGES      ?= data/demo_images/images.csv#  image folder (class sub-folders = labels) or CSV
MODEL       ?= efficientnet_lite0#         efficientnet_lite0|1|2, torchvision name, file.py:func, ckpt.pt
WEIGHTS     ?=#                            state-dict file for MODEL (empty: shipped / torchvision)
CLASSES     ?=#                            class names in output order: names.txt (one a line) or CSV index,name
INPUT_SIZE  ?=#                            side of the square network input in px (empty: the model's own)
MEAN        ?=#                            input normalisation mean, 1 or 3 values "0.5" (empty: the model's)
STD         ?=#                            input normalisation std, 1 or 3 values (empty: the model's)
RANDOM_INIT ?= 0#                          1: allow an untrained network (random weights)
UNSAFE_PICKLE ?= 0#                        1: load a whole pickled checkpoint (trusted files only)
LAYERS      ?=#                            comma-separated layer names (empty: model default; ViT/Swin/ConvNeXt: 5 blocks)
TOPK        ?= 100#                        top images kept per neuron
BATCH       ?= 32#                         images per forward pass
DEVICE      ?= auto#                       auto | cpu | cuda | cuda:N
GRID        ?= 10#                         mosaic tiles per side
TILE        ?= 64#                         mosaic tile side (px)
CROP        ?= rf#                         rf (receptive field) | mask (activation blob)
DEMO_N      ?= 1500#                       images in the offline demo probe set
WORKERS     ?= 2#                          decoding threads (01) and processes (02, 09)
DESCRIBER   ?= offline#                    03 backend: offline | hf | openai
NAMER       ?= model#                      03 offline: who names objects: model (the analysed one) | reference (Lite0, ImageNet)
VLM         ?=#                            03 model: hf folder/hub id, or the openai server's model name
BASE_URL    ?= http://127.0.0.1:8000/v1#   03 openai-compatible server (key in $$OPENAI_API_KEY)
PROMPTS     ?= common/prompts.yaml#        03 prompt file, one prompt per abstraction level
DOMAIN      ?=#                            03 what the images show, woven into prompts ("chest X-rays")
KEYWORDS    ?=#                            03 comma-separated domain terms woven into the deeper prompts
LEVELS      ?=#                            03 explicit layer=level pairs (1 = earliest); others by depth
TEXT_EMBEDDER ?= all-MiniLM-L6-v2#         04 sentence-transformers model (workstation: sentence-transformers/clip-ViT-L-14)
IMAGE_EMBEDDER ?= auto#                    04 auto (CLIP if its weights are on disk, else cnn) | cnn | clip
K_MIN       ?= 2#                          05 smallest number of clusters tried per layer
K_MAX       ?= 512#                        05 largest number tried (capped at neurons − 1)
PROJECTION  ?= umap#                       05 2-D maps: umap | pca
NLI_MODEL   ?=#                            05 local NLI model for concept categories (empty: embedding similarity)
TRACE_KIND  ?= fused#                      06 clustering traced: fused | text
THRESHOLD   ?= 0.5#                        06 smallest cosine kept as a link between clusters
FOLLOW      ?=#                            06 concept whose path is printed and highlighted (FOLLOW=yellow)
CONNECT_IMAGES ?= 16#                      06 images over which the connections between layers are measured (0: none)
CONNECT_THRESHOLD ?= 1#                    06 smallest connection strength linking two clusters (1: random wiring)
QUERY       ?=#                            07 query for `make search` (empty: interactive)
HITS        ?= 10#                         07 neurons listed per query
SCORING     ?= cosine#                     07 text ranking: cosine | baseline | neuron (README: measured)
TRUE        ?=#                            08 true class to debug: name, label or index (empty: automatic)
PRED        ?=#                            08 class it is mistaken for (empty: its most frequent)
MIN_ERRORS  ?= 5#                          08 auto: least misclassified images of a pair
MIN_SHARE   ?= 0.25#                       08 auto: least share of the class's errors going to that class
MAX_PAIRS   ?= 2#                          08 auto: most pairs analysed
FDR         ?= 0.05#                       08 Benjamini–Hochberg level of the neuron flag
ABLATE_TOP  ?= 10#                         08 suspect neurons zeroed in the causal check (0: skip)
SKIP_DEAD   ?= 0#                          03 1: leave out neurons the triage flags dead or barely active
MATCHER     ?= offline#                    09/13/14 concept matcher of the verification and the audit: offline | clip | clip:<model> (docs/vlm-families.md)
POLY        ?= 0#                          09 polysemanticity from which a neuron's crops are clustered (0: every selected neuron)
SELECT      ?= 0#                          09 SIEVE's selection: least selectivity p99/median of a clustered neuron (paper: 10; 0: off)
REFINE      ?= 3#                          09 DnR refinement: most rounds of asking the describer about a sentence's misses (0: none)
GENERATOR   ?= retrieve#                   09 images of a concept for the Activation Rate: retrieve (matcher's top held-out images) | diffusers (rendered)
GENERATOR_MODEL ?= stabilityai/sd-turbo#   09 diffusers: text-to-image pipeline, a folder or a Hugging Face id already on disk
GENERATE_N  ?= 8#                          09 diffusers: images rendered per sentence
GENERATE_STEPS ?= 1#                       09 diffusers: denoising steps (≤ 4: a distilled model, no guidance)
CONCEPTS    ?=#                            09/15 file of concept phrases, one per line (09: extra candidates; 15 label: empty = shipped list)
MIN_SCORE   ?=#                            07 search only neurons whose description 09 verified at least this well (verify_corr)
WEAK_BELOW  ?= 0.4#                         07 a text hit below this cosine is a weak match; none above it: no good match (docs/search.md)
BASKETS     ?= finch#                      11 how baskets are found: finch (the paper: FINCH clusters of images, filled by Eq. 1–4) | corr
BASKET_ALPHA ?= 3#                         11 finch: a neuron is active on an image at ≥ μ + α σ of the layer's neurons there (Eq. 2)
BASKET_BETA ?= 0.75#                       11 finch: a basket holds the neurons active on at least this share of its images (Eq. 4)
MIN_CORR    ?= 0.5#                        11 corr baskets: groups are joined while their members correlate at least this much
PRUNE       ?= 5#                          11 baskets named after a class pruned per class and repeat (0: no pruning)
REPEATS     ?= 5#                          11 seeded repeats of the random draws of the consistency and pruning tests
CONTROLS    ?= 3#                          13 random neuron sets of the same size per causal check
PRUNE_IMAGES ?= 40#                        11/13 labelled images per class used by the causal checks
UNION       ?=#                            11 two baskets or tree nodes whose union `make baskets` prints (UNION="_blocks.8:b3 _blocks.8:b4")
DIFFERENCE  ?=#                            11 two baskets A B (or corr tree nodes <layer>:n<node>): `make baskets` prints the neurons of A not in B
OTHER       ?=#                            12 the run compared with RUN by `make compare` (a name under DATA)
COMPARE_KIND ?= fused#                     12 vectors compared: fused | text
AUDIT       ?= examples/demo_audit.yaml#   13 concepts file: per class, valid and spurious concepts as text
AUDIT_LAYER ?=#                            13 layer audited (empty: the deepest)
AUDIT_TOP   ?= 20#                         13 most relevant neurons per class shown and checked
DESCRIBERS  ?=#                            14 two describers compared by `make describe-compare`: prompt files, offline[:namer], hf:<model>, openai:<model>
AUDIT_MARGIN ?= 0.2#                       13 alignment above the empty-text baseline needed for a label (0: SemanticLens)
LABEL_MARGIN ?= 0.3#                       15 score over the empty-text baseline a neuron's best concept must exceed to label it (0: SemanticLens)
HOST        ?= 127.0.0.1#                  07 `make serve`: address the atlas server listens on
PORT        ?= 8765#                       07 `make serve`: its port (0: any free port; 8000 is BASE_URL's)
DATA        ?= data#                       folder holding the runs
PYTHON      ?= python3#                    interpreter that creates .venv and takes the run lock

# Idle torch/OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads
# slowed the stages 10-20x.
export OMP_WAIT_POLICY ?= PASSIVE

.DEFAULT_GOAL := all
include tools/plumbing.mk
.PHONY: all test bench bench-scale help clean venv extract mosaics describe embed cluster trace search debug \
        score eval atlas serve baskets compare audit no-other reports-changed describe-compare \
        no-describers label mutants

# The files of each stage (their names are the artefact contract: ARTEFACTS.md). Each stage writes
# its .meta.json last and deletes the old one before replacing any output, so the metas are targets
# and prerequisites too: a stage killed midway lacks its meta, and make runs it again before
# anything that reads it.
EXTRACT      := $(D)/01_activations.npz
M01          := $(D)/01_extract.meta.json
MOSAICS      := $(D)/02_mosaics.csv
M02          := $(D)/02_mosaics.meta.json
DESCRIPTIONS := $(D)/03_descriptions.csv
M03          := $(D)/03_describe.meta.json
EMBEDDINGS   := $(D)/04_embeddings.npz
CROPVECTORS  := $(D)/04_crops.npz
M04          := $(D)/04_embed.meta.json
CLUSTERS     := $(D)/05_clusters.csv $(D)/05_metrics.csv $(D)/05_ksearch.csv \
                $(D)/05_keywords.csv $(D)/05_categories.csv
M05          := $(D)/05_cluster.meta.json
TRACE        := $(D)/06_trace.csv $(D)/06_sankey.html $(D)/06_sankey.png $(D)/06_connections.npz
M06          := $(D)/06_trace.meta.json
CONFUSION    := $(D)/08_confusion.csv
M08          := $(D)/08_debug.meta.json
SCORES       := $(D)/09_scores.csv $(D)/09_summary.csv $(D)/09_eval.csv $(D)/09_candidates.csv
M09          := $(D)/09_score.meta.json
ATLAS        := $(D)/atlas/index.html
M10          := $(D)/10_atlas.meta.json
BASKET_FILES := $(D)/11_baskets.csv $(D)/11_tree.npz $(D)/11_consistency.csv $(D)/11_pruning.csv
M11          := $(D)/11_baskets.meta.json
COMPARED     := $(D)/12_compare__$(OTHER)/12_compare.meta.json
RELEVANCE    := $(D)/13_relevance.npz
M13          := $(D)/13_audit/13_audit.meta.json
M14          := $(D)/14_describers/14_describers.meta.json
LABELS       := $(D)/15_labels.csv $(D)/15_concepts.csv
M15          := $(D)/15_label.meta.json

all: $(MOSAICS) $(DESCRIPTIONS) $(EMBEDDINGS) $(CLUSTERS) $(TRACE) $(SCORES) $(CONFUSION) $(ATLAS) $(M01) $(M02) $(M03) $(M04) $(M05) $(M06) $(M08) $(M09) $(M10) ## run every stage (01–10) on data/$(RUN)

# --- the stages, in run order (08 runs after 09, whose scores its reports show) -----------------
# File names are passed as --flag='name', so that spaces and leading dashes reach the script intact.

# 06, 11, 13 (and 09 with GENERATOR=diffusers) re-run the model 01 ran: the user names it again (a meta never chooses code to run).
MODEL_AGAIN := --model=$(call quote,$(MODEL)) $(if $(WEIGHTS),--weights=$(call quote,$(WEIGHTS))) \
               $(if $(filter 1,$(UNSAFE_PICKLE)),--unsafe-pickle)

# --- 01 extract: top images, per-image statistics and predictions --------------------------------
ARGS_01 := --model=$(call quote,$(MODEL)) $(if $(WEIGHTS),--weights=$(call quote,$(WEIGHTS))) \
           $(if $(CLASSES),--classes=$(call quote,$(CLASSES))) \
           $(if $(filter 1,$(RANDOM_INIT)),--random-init) \
           $(if $(filter 1,$(UNSAFE_PICKLE)),--unsafe-pickle) \
           $(if $(LAYERS),--layers $(LAYERS)) --topk $(TOPK) --batch-size $(BATCH) \
           --device $(DEVICE) --workers $(WORKERS) $(if $(INPUT_SIZE),--input-size $(INPUT_SIZE)) \
           $(if $(MEAN),--mean $(MEAN)) $(if $(STD),--std $(STD))
extract: $(EXTRACT) $(M01) ## 01: top-activating images of every neuron, per-image statistics, predictions
$(EXTRACT) $(M01) &: 01_extract.py $(if $(IS_DEMO),$(DEMO_IMAGES)) $(D)/.args/01 \
                    $(D)/.args/01-inputs $(call uses,01_extract.py) | $(VENV)
	$(HOLD) $(PY) 01_extract.py --images=$(call quote,$(IMAGES)) --run $(D) $(ARGS_01)

# --- 02 mosaics: each neuron's top crops tiled into one PNG --------------------------------------
ARGS_02 := --grid $(GRID) --tile $(TILE) --crop $(CROP) --workers $(WORKERS)
mosaics: $(MOSAICS) $(M02) ## 02: a mosaic of each neuron's top crops
$(MOSAICS) $(M02) &: 02_mosaics.py $(EXTRACT) $(M01) $(D)/.args/02 $(call uses,02_mosaics.py) \
                | $(VENV)
	$(HOLD) $(PY) 02_mosaics.py --run $(D) $(ARGS_02)

# --- 03 describe: a sentence per mosaic, the prompt fitted to the layer's depth ------------------
ARGS_03 := --backend $(DESCRIBER) $(if $(VLM),--model $(VLM)) --prompts $(PROMPTS) --namer $(NAMER) \
           --analysed-model=$(call quote,$(MODEL)) \
           $(if $(WEIGHTS),--analysed-weights=$(call quote,$(WEIGHTS))) \
           $(if $(filter 1,$(UNSAFE_PICKLE)),--unsafe-pickle) \
           $(if $(DOMAIN),--domain "$(DOMAIN)") $(if $(KEYWORDS),--keywords "$(KEYWORDS)") \
           $(if $(LEVELS),--levels $(LEVELS)) --base-url $(BASE_URL) --device $(DEVICE)
DESCRIBE_03 := $(ARGS_03)
ARGS_03 += $(if $(filter 1,$(SKIP_DEAD)),--skip-dead)
describe: $(DESCRIPTIONS) $(M03) ## 03: a sentence for each mosaic (DESCRIBER=offline|hf|openai)
$(DESCRIPTIONS) $(M03) &: 03_describe.py $(MOSAICS) $(M02) $(EXTRACT) $(M01) $(PROMPTS) \
                $(D)/.args/03 $(call uses,03_describe.py) | $(VENV)
	$(HOLD) $(PY) 03_describe.py --run $(D) $(ARGS_03)

# --- 04 embed: text, image and fused vectors of each neuron -------------------------------------
ARGS_04 := --text-model $(TEXT_EMBEDDER) --image-model $(IMAGE_EMBEDDER) --device $(DEVICE)
embed: $(EMBEDDINGS) $(M04) ## 04: text, image and fused embeddings of each neuron
$(EMBEDDINGS) $(CROPVECTORS) $(M04) &: 04_embed.py $(DESCRIPTIONS) $(M03) $(MOSAICS) $(M02) \
                $(D)/.args/04 $(call uses,04_embed.py) | $(VENV)
	$(HOLD) $(PY) 04_embed.py --run $(D) $(ARGS_04)

# --- 05 cluster: per-layer clusters, their quality, keywords and 2-D maps ------------------------
ARGS_05 := --k-min $(K_MIN) --k-max $(K_MAX) --projection $(PROJECTION) \
           $(if $(NLI_MODEL),--nli-model $(NLI_MODEL)) --device $(DEVICE)
cluster: $(CLUSTERS) $(M05) ## 05: clusters of neurons per layer, with metrics, keywords and maps
$(CLUSTERS) $(M05) &: 05_cluster.py $(DESCRIPTIONS) $(M03) $(EMBEDDINGS) $(M04) $(EXTRACT) \
                $(M01) $(D)/.args/05 $(call uses,05_cluster.py) | $(VENV)
	$(HOLD) $(PY) 05_cluster.py --run $(D) $(ARGS_05)

# --- 06 trace: how the clusters of one layer lead to those of the next --------------------------
# 06 re-runs 01's model once to measure the connections (kept while 01 and the sample are unchanged).
ARGS_06 := --kind $(TRACE_KIND) --threshold $(THRESHOLD) $(if $(FOLLOW),--follow "$(FOLLOW)") \
           --device $(DEVICE) --connect-images $(CONNECT_IMAGES) \
           --connect-threshold $(CONNECT_THRESHOLD) $(MODEL_AGAIN)
trace: $(TRACE) $(M06) ## 06: links between the clusters of consecutive layers, by sentences and by connections (a Sankey diagram)
$(TRACE) $(M06) &: 06_trace.py $(D)/05_clusters.csv $(D)/05_keywords.csv $(M05) \
                $(EXTRACT) $(M01) $(D)/.args/06 $(call uses,06_trace.py) | $(VENV)
	$(HOLD) $(PY) 06_trace.py --run $(D) $(ARGS_06)

# --- 07 search: neurons matching a free text (printed; live in the atlas with `make serve`) -------
ARGS_07 := --scoring $(SCORING) $(if $(MIN_SCORE),--min-score $(MIN_SCORE)) --device $(DEVICE) \
           --weak-below $(WEAK_BELOW) --host $(HOST) --port $(PORT)
search: $(EMBEDDINGS) $(M04) $(if $(MIN_SCORE),$(SCORES) $(M09)) | $(VENV) ## 07: find neurons: make search QUERY="a dog with a ball" (no QUERY: interactive)
	$(PY) 07_search.py --run $(D) $(ARGS_07) --top-k $(HITS) \
	    $(if $(QUERY),"$(QUERY)",--interactive)

serve: $(ATLAS) $(M10) | $(VENV) ## 07: serve the atlas with live search (text and image) on http://$(HOST):$(PORT)/
	$(PY) 07_search.py --serve --run $(D) $(ARGS_07)

# --- 08 debug: neurons that fire differently when a class is mistaken for another ---------------
ARGS_08 := --model=$(call quote,$(MODEL)) $(if $(WEIGHTS),--weights=$(call quote,$(WEIGHTS))) \
           $(if $(TRUE),--true "$(TRUE)") $(if $(PRED),--pred "$(PRED)") \
           --min-errors $(MIN_ERRORS) --min-share $(MIN_SHARE) --max-pairs $(MAX_PAIRS) \
           --fdr $(FDR) --ablate-top $(ABLATE_TOP) --batch-size $(BATCH) --device $(DEVICE) \
           $(if $(filter 1,$(UNSAFE_PICKLE)),--unsafe-pickle)
debug: $(CONFUSION) $(M08) ## 08: debug reports in data/$(RUN)/08_debug/ (TRUE=palace PRED="bell cote": one pair)
$(CONFUSION) $(M08) &: 08_debug.py $(EXTRACT) $(M01) $(MOSAICS) $(M02) $(DESCRIPTIONS) \
                $(M03) $(D)/.args/08 $(call uses,08_debug.py) | $(VENV)
	$(HOLD) $(PY) 08_debug.py --run $(D) $(ARGS_08)

# --- 09 score: triage, interpretability scores, sub-concepts, verification of each sentence ------
# 09 describes sub-concepts with the run's describer: 03's describer arguments (not --skip-dead).
# 09 and 13 take images of a concept the same way (common.generation.GeneratorSettings)
GENERATE := --generator $(GENERATOR) \
            $(if $(filter diffusers,$(GENERATOR)),--generator-model=$(call quote,$(GENERATOR_MODEL)) \
              --generate-n $(GENERATE_N) --generate-steps $(GENERATE_STEPS))
ARGS_09 := --matcher $(MATCHER) --poly-threshold $(POLY) --select $(SELECT) \
           --text-model $(TEXT_EMBEDDER) --device $(DEVICE) --workers $(WORKERS) \
           --refine $(REFINE) $(if $(CONCEPTS),--concepts $(call quote,$(CONCEPTS))) \
           --describe-args $(call quote,$(DESCRIBE_03)) $(GENERATE) \
           $(if $(filter diffusers,$(GENERATOR)),$(MODEL_AGAIN))
score: $(SCORES) $(M09) ## 09: triage, interpretability and verification scores; sub-concepts
$(SCORES) $(M09) &: 09_score.py $(EXTRACT) $(M01) $(MOSAICS) $(M02) \
                $(DESCRIPTIONS) $(M03) $(EMBEDDINGS) $(CROPVECTORS) $(M04) $(PROMPTS) \
                $(CONCEPTS) $(D)/.args/09 $(call uses,09_score.py) | $(VENV)
	$(HOLD) $(PY) 09_score.py --run $(D) $(ARGS_09)

eval: $(SCORES) $(M09) ## 09: final-layer benchmark (needs the classifier's output among LAYERS, e.g. LAYERS=_blocks.15,_fc)
	@$(PY) -c "import json, sys; print(json.load(open(sys.argv[1]))['eval_report'])" $(M09)

# --- 10 atlas: the browsable site of everything above --------------------------------------------
ARGS_10 := --workers $(WORKERS)#  10 only renders: the model ran in 08
ATLAS_INPUTS := $(MOSAICS) $(M02) $(DESCRIPTIONS) $(M03) $(EMBEDDINGS) $(M04) $(CLUSTERS) \
                $(M05) $(TRACE) $(M06) $(SCORES) $(M09) $(CONFUSION) $(M08)#  what the atlas shows
# The atlas also shows the reports made on request (baskets, audit, comparisons), so it is rebuilt
# after each: `make baskets`, `audit` and `compare` end with the atlas, whose rule then lists the
# report being made. A report (or 13's relevance) newer than the atlas — its script run by hand,
# or a make stopped before the atlas — makes the atlas out of date, as does a new 04, 05 or 09 of
# a run compared with this one. `make all` never re-makes a report: the atlas marks one made from outputs that
# have changed since as out of date, with the command that refreshes it.
REPORTS_ASKED := $(if $(filter baskets,$(MAKECMDGOALS)),$(M11)) \
                 $(if $(filter audit,$(MAKECMDGOALS)),$(M13)) \
                 $(if $(filter label,$(MAKECMDGOALS)),$(M15)) \
                 $(if $(and $(filter compare,$(MAKECMDGOALS)),$(OTHER)),$(COMPARED))
REPORTS_MADE  := $(wildcard $(M11) $(M13) $(M15) $(D)/13_relevance.meta.json \
                     $(D)/12_compare__*/12_compare.meta.json)
REPORTS_NEWER := $(if $(REPORTS_MADE),$(shell for f in $(REPORTS_MADE); do \
                     test "$$f" -nt $(M10) && echo "$$f"; done))
COMPARED_RUNS := $(patsubst $(D)/12_compare__%/12_compare.meta.json,%,$(filter \
                     $(D)/12_compare__%,$(REPORTS_MADE)))
OTHER_INPUTS  := $(wildcard $(foreach r,$(COMPARED_RUNS),$(addprefix $(DATA)/$(r)/,\
                     04_embed.meta.json 05_cluster.meta.json 09_score.meta.json)))

atlas: $(ATLAS) $(M10) ## 10: the browsable site data/$(RUN)/atlas/index.html (opens from disk)
$(ATLAS) $(M10) &: 10_atlas.py $(ATLAS_INPUTS) $(REPORTS_ASKED) $(OTHER_INPUTS) \
                $(if $(REPORTS_NEWER),reports-changed) $(D)/.args/10 $(call uses,10_atlas.py) | $(VENV)
	$(HOLD) $(PY) 10_atlas.py --run $(D) $(ARGS_10)
reports-changed:

# --- 11 baskets (on request): groups of neurons that fire together -------------------------------
ARGS_11 := $(MODEL_AGAIN) --method $(BASKETS) --alpha $(BASKET_ALPHA) --beta $(BASKET_BETA) \
           --min-corr $(MIN_CORR) --grid $(GRID) --tile $(TILE) --prune $(PRUNE) \
           --repeats $(REPEATS) --prune-images $(PRUNE_IMAGES) --batch-size $(BATCH) \
           --device $(DEVICE) --describe-args $(call quote,$(DESCRIBE_03))
baskets: $(BASKET_FILES) $(M11) $(ATLAS) $(M10) ## 11: neuron baskets in data/$(RUN)/11_* (and in the atlas); UNION="A B" / DIFFERENCE="A B" print a set of two
	$(if $(UNION),$(HOLD) $(PY) 11_baskets.py --run $(D) --union $(UNION) $(ARGS_11))
	$(if $(DIFFERENCE),$(HOLD) $(PY) 11_baskets.py --run $(D) --difference $(DIFFERENCE) $(ARGS_11))
$(BASKET_FILES) $(M11) &: 11_baskets.py $(EXTRACT) $(M01) $(DESCRIPTIONS) $(M03) \
                $(PROMPTS) $(D)/.args/11 $(call uses,11_baskets.py) | $(VENV)
	$(HOLD) $(PY) 11_baskets.py --run $(D) $(ARGS_11)

# --- 12 compare (on request): this run against another one, neuron by neuron --------------------
ARGS_12 := --kind $(COMPARE_KIND)
compare: $(if $(OTHER),$(COMPARED) $(ATLAS) $(M10),no-other) ## 12: compare two runs: make compare RUN=a OTHER=b (both after make all); the atlas of a shows it
no-other:
	@echo "make compare needs OTHER=<run> (a second run under $(DATA)/)"; exit 2
$(COMPARED): 12_compare.py $(EMBEDDINGS) $(M04) $(D)/05_clusters.csv $(M05) $(D)/09_summary.csv \
             $(DATA)/$(OTHER)/04_embeddings.npz $(DATA)/$(OTHER)/05_clusters.csv \
             $(DATA)/$(OTHER)/09_summary.csv $(call uses,12_compare.py) | $(VENV)
	$(HOLD) $(PY) 12_compare.py --run $(D) --other $(DATA)/$(OTHER) $(ARGS_12)

# --- 13 audit (on request): each class's valid and spurious concepts among its relevant neurons --
ARGS_13 := --audit=$(call quote,$(AUDIT)) $(if $(AUDIT_LAYER),--layer $(AUDIT_LAYER)) \
           --top $(AUDIT_TOP) --margin $(AUDIT_MARGIN) --controls $(CONTROLS) \
           --images-per-class $(PRUNE_IMAGES) --batch-size $(BATCH) --device $(DEVICE) \
           --matcher $(MATCHER) --text-model $(TEXT_EMBEDDER) --workers $(WORKERS) $(MODEL_AGAIN) \
           $(GENERATE)
audit: $(M13) $(ATLAS) $(M10) ## 13: audit classes against AUDIT (concepts YAML): reports in data/$(RUN)/13_audit/ and the atlas
$(RELEVANCE) $(D)/13_relevance.meta.json &: 13_audit.py $(EXTRACT) $(M01) \
                $(call uses,13_audit.py) | $(VENV)
	$(HOLD) $(PY) 13_audit.py relevance --run $(D) --batch-size $(BATCH) --device $(DEVICE) \
	    $(MODEL_AGAIN)
$(M13): 13_audit.py $(RELEVANCE) $(D)/13_relevance.meta.json $(EMBEDDINGS) $(M04) \
        $(DESCRIPTIONS) $(M03) $(MOSAICS) $(M02) $(AUDIT) $(D)/.args/13 $(call uses,13_audit.py) \
        | $(VENV)
	$(HOLD) $(PY) 13_audit.py audit --run $(D) $(ARGS_13)

# --- 14 describe-compare (on request): two describers on the same mosaics, scored by 09's check --
ARGS_14 := --describers "$(DESCRIBERS)" --matcher $(MATCHER) --text-model $(TEXT_EMBEDDER) \
           --device $(DEVICE) --workers $(WORKERS) --describe-args $(call quote,$(DESCRIBE_03))
describe-compare: $(if $(DESCRIBERS),$(M14),no-describers) ## 14: which describer explains the neurons best: make describe-compare DESCRIBERS="a.yaml b.yaml" (or offline:reference, hf:<model>, openai:<model>); report in data/$(RUN)/14_describers/
no-describers:
	@echo 'make describe-compare needs DESCRIBERS="a b" (two prompt files or describers)'; exit 2
$(M14): 14_describers.py $(EXTRACT) $(M01) $(MOSAICS) $(M02) $(DESCRIPTIONS) $(M03) $(EMBEDDINGS) \
        $(CROPVECTORS) $(M04) $(D)/.args/14 $(call uses,14_describers.py) | $(VENV)
	$(HOLD) $(PY) 14_describers.py --run $(D) $(ARGS_14)

# --- 15 label (on request): each neuron's best concept of a list, and the concepts no neuron has --
ARGS_15 := $(if $(CONCEPTS),--concepts=$(call quote,$(CONCEPTS))) --margin $(LABEL_MARGIN) \
           --device $(DEVICE)
label: $(LABELS) $(M15) $(ATLAS) $(M10) ## 15: label every neuron with its best concept of CONCEPTS (empty: common/concepts.txt) and list each layer's missing concepts; in the atlas
$(LABELS) $(M15) &: 15_label.py $(EXTRACT) $(M01) $(EMBEDDINGS) $(CROPVECTORS) $(M04) $(CONCEPTS) \
                $(D)/.args/15 $(call uses,15_label.py) | $(VENV)
	$(HOLD) $(PY) 15_label.py --run $(D) $(ARGS_15)

# --- the project's own commands ----------------------------------------------------------------
help: ## list targets and variables
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'
	@echo; echo "Variables (default):"
	@grep -hE '^[A-Z_]+ +\?=' $(MAKEFILE_LIST) | sed -E 's/ *\?= */ = /; s/# */\t# /'

test: $(VENV) ## run the test suite (offline, CPU)
	$(PY) -m pytest -q tests

bench: $(VENV) ## benchmarks: print measured ratios against their targets
	$(PY) bench/results.py bench/bench_extract.py bench/bench_mosaics.py \
	    bench/bench_describe_embed.py "bench/bench_cluster.py --threads 1" bench/bench_score.py \
	    bench/bench_atlas.py bench/bench_relevance.py

bench-scale: $(VENV) ## benchmark: every stage's time and memory at 1×–8× the images and the neurons (hours on 2 cores)
	$(PY) bench/results.py bench/bench_scale.py

mutants: $(DEV_VENV) $(call uses,tools/mutants.py) ## mutation testing of the core modules (tools/mutants.toml, under 30 min): score and survivors to bench/RESULTS.md
	$(PY) -m tools.mutants

clean: ## remove the outputs of data/$(RUN) except the (expensive) descriptions (03's, and 09's of sub-concepts)
	cd $(call quote,$(D)) && rm -rf 01_* 02_* 04_* 05_* 06_* 07_* 08_* .args 09_scores.csv 09_candidates.csv \
	    09_summary.csv 09_eval.csv 09_score.meta.json 09_subconcepts/09_mosaics.* \
	    09_subconcepts/*/ 10_* atlas 11_* 12_* 13_* 14_describers/*.csv \
	    14_describers/report.* 14_describers/14_describers.meta.json

include tools/arguments.mk
