#!/bin/sh
# The GPU run of the scaling work (issue 24), ready to go on a lent machine: run from the project
# root as `sh bench/gpu.sh` (the device tool: run(command="sh bench/gpu.sh", timeout_s=540)).
# It uses the machine's own python3 (which holds torch with CUDA there), checks that what 01 and
# the hf describer import is present, then runs bench/bench_gpu.py: 01 on random-init ResNet-50
# over 20,000 synthetic 224-px images against a bare forward loop (target ≥ 0.9), the hf
# describer's neurons per minute with a tiny random LLaVA, and peak GPU memory. About 3-5 minutes
# on one H100; arguments are passed on (e.g. `sh bench/gpu.sh --n 2000` for a short try).
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-python3}
missing=$("$PY" - <<'PY'
import importlib.util
need = ["torch", "torchvision", "numpy", "PIL", "tqdm", "yaml", "jinja2", "transformers", "tokenizers",
        "threadpoolctl"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "bench/gpu.sh: $PY lacks: $missing — install them (pip install -r requirements.txt) or" \
         "set PY to an interpreter that has them" >&2
    exit 2
fi
"$PY" -c 'import torch; print("CUDA:", torch.cuda.is_available(), torch.version.cuda)'
exec "$PY" bench/bench_gpu.py "$@"
