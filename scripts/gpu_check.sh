#!/usr/bin/env bash
# Every GPU check and benchmark in one command (about 5 minutes, at most 8; steps in priority order) on one
# H100/H200 machine with torch + CUDA and no faiss-gpu. Writes one JSON of results: the first argument, else
# $OUT/gpu_check.json.
#
#   1. On a machine with PyPI access, in the repo root, fetch what the GPU image lacks (Python 3.12 wheels):
#        echo /.whl/ >> .git/info/exclude; scripts/gpu_check.sh --fetch-wheels
#   2. On the GPU machine (the device tool: carry [".whl"], timeout_s 480):
#        scripts/gpu_check.sh                      # -> $OUT/gpu_check.json and $OUT/gpu_check.log
#
# Steps (each under its own timeout; a failed step is recorded and the others still run; the JSON is
# rewritten after every step, so a run cut short still returns what finished):
#   tests      pytest -m gpu: torch k-means on CUDA (fp32/tf32/bf16) vs CPU, nvjpeg decode vs CPU decode,
#              the embed stage on CUDA taking the tensor path, bench_embed --quick on CUDA
#   embed      bench_embed: ViT-B-32 (random init) bf16, 30k 375x500 JPEGs, tensor path vs bare forward, the
#              decode ceilings alone, and the stage again with other decode settings (--variants)
#   cluster    bench_cluster --compute-only: 2M x 512, k=16,384, 20 iterations, torch CUDA k-means (bf16 and
#              tf32 assignment) fit + assignment, vs faiss on the CPU (all cores, scaled from a subset)
#   check      bench_embed --check: the tensor path vs open_clip's PIL preprocess (uint8 levels), and the ssp
#              recipe on CUDA vs on the CPU (embedding cosine, cluster agreement, kept-set overlap)
#   embed_mixed  the same with JPEGs of random sizes (no same-size resize batches), 6k images
#   embed_pil  bench_embed: the PIL path with 15 decode threads (the anchor's CPU-decode figure)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 faiss-cpu==1.15.1 braceexpand==0.1.7"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl $WHEELS
    exit $?
fi

RESULT=${1:-${OUT:-/tmp}/gpu_check.json}
TMP=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG=${OUT:-$TMP}/gpu_check.log
mkdir -p "$(dirname "$RESULT")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
: >"$LOG"

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

STEPS="tests embed cluster check embed_mixed embed_pil"
collect() {  # gather every step's status and result into $RESULT
    python3 - "$TMP" "$RESULT" "$START" "$STEPS" <<'EOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
tmp, result, start, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()
out = {"env": (tmp / "env.txt").read_text().strip().splitlines() if (tmp / "env.txt").exists() else None,
       "total_seconds": int(time.time()) - start}
for name in steps:
    status = tmp / f"{name}.status"
    out[name] = {"status": json.loads(status.read_text()) if status.exists() else None}
    data = tmp / f"{name}.json"
    if data.exists():
        out[name]["result"] = json.loads(data.read_text())
junit = tmp / "junit.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    out["tests"]["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["tests"]["failed"] = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
result.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
print(json.dumps({k: (v.get("status") if isinstance(v, dict) else v) for k, v in out.items()}))
EOF
}

step() {  # step NAME TIMEOUT COMMAND...: run, log, record the exit code, rewrite the JSON
    local name=$1 limit=$2
    shift 2
    if [[ -n "${GPU_CHECK_ONLY:-}" && " $GPU_CHECK_ONLY " != *" $name "* ]]; then return; fi
    local t0=$(date +%s)
    echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "{\"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >"$TMP/$name.status"
    echo "=== $name rc=$rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
    collect >/dev/null
}

# GPU_CHECK_QUICK=1: the same steps at tiny sizes on CPU, to check this script itself on any machine.
# GPU_CHECK_ONLY="embed cluster": run only those steps.
if [[ -n "${GPU_CHECK_QUICK:-}" ]]; then
    DEV=cpu EMB_N=64 MIX_N=64 PIL_N=64 CL="--n 20000 --k 64 --faiss-rows 5000" CHECK="--quick --check-images 32"
    VARIANTS="threads=1;threads=2,cpu_share=0.5" DECODE="--image-decode tensor"
else
    DEV=cuda EMB_N=30000 MIX_N=6000 PIL_N=6000 CL="--n 2000000 --k 16384" CHECK=
    VARIANTS="threads=0;threads=1;threads=0,prefetch=6;threads=2,cpu_share=0.15,cpu_workers=4" DECODE=
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; } >"$TMP/env.txt" 2>&1
step tests 150 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --junitxml="$TMP/junit.xml" \
    tests/test_kmeans_torch.py tests/test_gpu_decode.py tests/test_bench_quick.py
step embed 150 python3 scripts/bench_embed.py --device $DEV $DECODE --images $EMB_N --distinct 256 --batch-size 256 \
    --variants "$VARIANTS" --json "$TMP/embed.json"
step cluster 120 python3 scripts/bench_cluster.py --compute-only $CL --device $DEV --json "$TMP/cluster.json"
step check 120 python3 scripts/bench_embed.py --device $DEV --check $CHECK --json "$TMP/check.json"
step embed_mixed 60 python3 scripts/bench_embed.py --device $DEV $DECODE --mixed-sizes --images $MIX_N --distinct 256 \
    --json "$TMP/embed_mixed.json"
step embed_pil 60 python3 scripts/bench_embed.py --device $DEV --image-decode pil --decode-workers 15 \
    --images $PIL_N --distinct 256 --json "$TMP/embed_pil.json"
collect
echo "results: $RESULT (log: $LOG)"
