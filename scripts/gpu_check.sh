#!/usr/bin/env bash
# The GPU check: everything mtlref promises on CUDA, measured once on one GPU in <= 6 minutes.
#
#     bash scripts/gpu_check.sh OUT_DIR
#
# Writes OUT_DIR/gpu_check.json (what was measured, the GPU named) and OUT_DIR/gpu_check.log:
#   1. `pytest -m cuda`: bf16 autocast with fp32 adapters, merging into a bf16 base, generation
#      with the KV cache, checkpoint + resume on CUDA, a one-process NCCL group (tests/test_cuda.py);
#   2. bench.py on the public Llama-2-7b-hf config (tests/data) with random bf16 weights made on the
#      GPU (no download): every method and the floor, batch 8 x 512, tokens/s, ratios, the floor's
#      model-FLOPs utilisation against the GPU's bf16 peak, per-step peak memory, and the peer
#      (transformers + peft LoRA on the same weights) where both are importable;
#   3. the main job on CUDA (`train.py --method more --bench glue --device cuda`) and its wall time.
# Without a CUDA device it prints one line and exits with 3. It needs mtlref and the experiments/
# workbench importable (bench.py's harness is experiments/bench/; the repository with its .venv, or
# torch and this repository pip-installed) and, for step 3, the GLUE data and MiniLM (scripts/setup.sh);
# a step that cannot run is recorded as such and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to measure"
  exit 3
fi
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step() {   # name, time limit in s, command...: run it, record rc and seconds in OUT/<name>.status
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name: $*"
  timeout "$limit" "$@"
  local rc=$?
  echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" > "$OUT/$name.status"
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"
}

step cuda_tests 90 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" tests/test_cuda.py
step bench_7b 180 "$PY" bench.py --config tests/data/llama-2-7b-hf.config.json --device cuda --batch-size 8 \
  --seq-len 512 --repeats 5 --warmup 2 --infer-batch-sizes 1,8,32 --infer-repeats 3 --skip-memory \
  --out "$OUT/bench_7b.json"
step main_job 150 "$PY" train.py --method more --bench glue --device cuda --out "$OUT/glue-more"

"$PY" - "$OUT" "$start" <<'PY'
import json, sys, time
from pathlib import Path
import torch
out, start = Path(sys.argv[1]), float(sys.argv[2])
def read(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
bench = read("bench_7b.json")
summary = {
    "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
    "steps": {n: read(f"{n}.status") for n in ("cuda_tests", "bench_7b", "main_job")},
    "bench_7b": None if bench is None else {
        "floor_mfu": bench.get("floor_mfu"), "peer": bench.get("peer"), "peer_reason": bench.get("peer_reason"),
        "training": {n: {k: r.get(k) for k in ("tokens_per_s", "vs_floor", "vs_lora", "cuda_step_peak_mb", "target")}
                     for n, r in bench["training"].items()}},
    "main_job": read("glue-more/metrics.json"),
    "wall_s": round(time.time() - start, 1),
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
print(f"gpu_check: wrote {out / 'gpu_check.json'} ({summary['wall_s']:.0f} s)")
PY
