#!/usr/bin/env bash
# One GPU readiness check, bounded to under 10 minutes (docs/GPU.md):
#   1. env        nvidia-smi, torch / CUDA / cuDNN versions, the device, bf16 support
#   2. sd_fp32    SD v1.x-architecture UNet it/s at batch 1/2/4/8 with guidance, VAE decode at 512, peak memory
#   3. sd_fp16    the same in float16
#   4. train_amp  trainer step cost: amp off/bf16/fp16 x channels_last on/off (ce, oal-energy)
#   5. pytest_cuda    the tests marked `cuda`
#   6. train_compile  trainer step cost with compile off/on (amp off/bf16, channels_last on)
# Each part runs under its own timeout, capped by what is left of the total budget, so one hang
# cannot eat the rest. Results: <out>/<part>.json and .log, <out>/summary.json and summary.txt.
#
#   benchmarks/gpu_check.sh [OUT_DIR]         # OUT_DIR, else $OUT, else artifacts/gpu_check
#   GPU_CHECK_DEVICE=cpu benchmarks/gpu_check.sh /tmp/dry   # dry run on the CPU, tiny sizes
#   GPU_CHECK_BUDGET_S=540                    # the total bound in seconds (default 540)
#
# Needs only the repo and its .venv (no internet: models are built from benchmarks/sd_v1_configs
# with random weights). A redis-server on the PATH is started on a spare port for the one cuda
# test that goes through the worker; without one, that test is left out and the summary says so.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT_DIR=${1:-${OUT:-artifacts/gpu_check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
START=$(date +%s)
export PYTHONPATH=$ROOT HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PARTS_FILE=$OUT_DIR/parts.jsonl
: >"$PARTS_FILE"

if [ "$DEVICE" = cuda ]; then
  THREADS=$(nproc)
  SD_ARGS=(--batches 1 2 4 8 --repeats 3 --steps 50)
  SD_HALF=float16
  TRAIN_ARGS=(--batch 512 --train-subset 4096 --rounds 5 --steps 5 --model resnet_small)
  AMP_MODES=(off bf16 fp16)
  COMPILE_ARGS=(--recipes ce oal-energy --amp off bf16)
  T_SD32=110 T_SD16=90 T_AMP=120 T_PYTEST=180 T_COMPILE=110
else
  # Dry run: the same commands at tiny sizes, to prove the script end to end without a GPU.
  # fp16 is CUDA only in the trainer (refused on the CPU), so the CPU run tries off and bf16.
  THREADS=1
  SD_ARGS=(--batches 1 --repeats 1 --steps 2 --latent-size 8)
  SD_HALF=bfloat16
  TRAIN_ARGS=(--batch 32 --train-subset 128 --rounds 2 --steps 1 --model resnet_tiny)
  AMP_MODES=(off bf16)
  COMPILE_ARGS=(--recipes ce --amp off bf16)  # CPU compilation takes about a minute a variant
  T_SD32=240 T_SD16=240 T_AMP=240 T_COMPILE=400 T_PYTEST=120
  BUDGET=${GPU_CHECK_BUDGET_S:-1500}
fi

# run_part NAME TIMEOUT_S CMD...: the command under `timeout`, capped by the budget left; its
# exit status, seconds and whether it timed out go to parts.jsonl.
run_part() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    echo "{\"part\": \"$name\", \"rc\": null, \"seconds\": 0, \"timed_out\": false, \"skipped\": \"budget spent\"}" >>"$PARTS_FILE"
    echo "== $name: skipped, budget spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local took=$(($(date +%s) - t0))
  local timed_out=false
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && timed_out=true
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"timed_out\": $timed_out, \"limit_s\": $limit}" >>"$PARTS_FILE"
  echo "   rc $rc in ${took}s"
  tail -n 3 "$OUT_DIR/$name.log" | sed 's/^/   | /'
}

env_part() {
  uptime
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not on the PATH"; fi
  "$PY" - "$OUT_DIR/env.json" <<'EOF'
import json, os, sys, torch
info = {
    "torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "device_count": torch.cuda.device_count(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
# The trainer parts and tests train on Fashion-MNIST: say up front whether this machine has it.
from oal_shared.data.fashion_mnist import find_split_files, fmnist_search_dirs
from oal_shared.settings import get_settings
found = [str(d) for d in fmnist_search_dirs(get_settings()) if find_split_files(d, "train")]
info["fashion_mnist"] = found[0] if found else None
if not found:
    print("Fashion-MNIST not found: copy it (30 MB of .gz) to data/fashion-mnist or set OAL_FMNIST_DIR; "
          "the trainer parts and their tests will fail without it")
print(json.dumps(info, indent=2))
open(sys.argv[1], "w").write(json.dumps(info, indent=2) + "\n")
EOF
}

export -f env_part
export PY OUT_DIR
run_part env 30 bash -c env_part

run_part sd_fp32 "$T_SD32" "$PY" benchmarks/bench_sd_scale.py --device "$DEVICE" --dtype float32 \
  --threads "$THREADS" "${SD_ARGS[@]}" --json "$OUT_DIR/sd_fp32.json"
run_part "sd_$SD_HALF" "$T_SD16" "$PY" benchmarks/bench_sd_scale.py --device "$DEVICE" --dtype "$SD_HALF" \
  --threads "$THREADS" "${SD_ARGS[@]}" --json "$OUT_DIR/sd_$SD_HALF.json"

run_part train_amp "$T_AMP" "$PY" benchmarks/bench_recipes.py --device "$DEVICE" --threads "$THREADS" \
  "${TRAIN_ARGS[@]}" --recipes ce oal-energy --amp "${AMP_MODES[@]}" --channels-last on off \
  --json "$OUT_DIR/train_amp.json"

# The cuda tests; the worker test needs Redis: a throwaway server on a spare port if one is installed.
MARKS="cuda"
REDIS_PID=""
if command -v redis-server >/dev/null; then
  REDIS_PORT=${GPU_CHECK_REDIS_PORT:-6391}
  redis-server --port "$REDIS_PORT" --save "" --appendonly no --daemonize no >"$OUT_DIR/redis.log" 2>&1 &
  REDIS_PID=$!
  export OAL_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/4
  sleep 1
else
  MARKS="cuda and not redis"
  echo "redis-server not found: the cuda tests that need Redis are left out" | tee "$OUT_DIR/redis.log"
fi
run_part pytest_cuda "$T_PYTEST" "$PY" -m pytest -m "$MARKS" -q -rA -p no:cacheprovider \
  --junitxml "$OUT_DIR/pytest_cuda.xml" tests
[ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null

run_part train_compile "$T_COMPILE" "$PY" benchmarks/bench_recipes.py --device "$DEVICE" --threads "$THREADS" \
  "${TRAIN_ARGS[@]}" "${COMPILE_ARGS[@]}" --compile off on \
  --json "$OUT_DIR/train_compile.json"

"$PY" - "$OUT_DIR" "$DEVICE" "$MARKS" <<'EOF'
"""summary.json and summary.txt from the parts' JSON files."""
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, device, marks = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines()]
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
summary = {"device": device, "parts": parts, "env": load("env"), "pytest_marks": marks}
lines = [f"gpu_check on {device}: " + ", ".join(f"{p['part']} rc={p['rc']} {p['seconds']}s" + (" TIMEOUT" if p["timed_out"] else "") for p in parts)]
env = summary["env"] or {}
lines.append(f"torch {env.get('torch')} cuda {env.get('cuda_build')} available={env.get('cuda_available')} "
             f"device={env.get('device')} bf16={env.get('bf16')} load={env.get('loadavg')} "
             f"fashion_mnist={env.get('fashion_mnist')}")
for name in ("sd_fp32", "sd_float16", "sd_bfloat16"):
    sd = load(name)
    if sd:
        summary[name] = {b: {k: row[k] for k in ("unet_step_s", "unet_it_per_s", "peak_gpu_gib")} for b, row in sd["per_batch"].items()}
        summary[name]["vae_decode_s"], summary[name]["peak_gpu_gib"] = sd["vae_decode_512_s"], sd["peak_gpu_gib"]
        rows = "; ".join(f"b{b} {row['unet_it_per_s']:.2f} it/s" + (f" {row['peak_gpu_gib']:.1f} GiB" if row["peak_gpu_gib"] else "") for b, row in sd["per_batch"].items())
        lines.append(f"{name} (latents {sd['latent_size']}): UNet {rows}; VAE decode {sd['vae_decode_512_s']:.3f} s")
for name in ("train_amp", "train_compile"):
    bench = load(name)
    if bench:
        summary[name] = {v: {k: row[k] for k in ("step_s", "ratio_to_baseline", "warmup_s", "amp_skipped_steps", "peak_gpu_gib")} for v, row in bench["variants"].items()}
        lines.append(f"{name} (batch {bench['batch']}, x {bench['baseline']!r}): " + "; ".join(f"{v} {row['step_s'] * 1000:.1f} ms x{row['ratio_to_baseline']:.2f} warmup {row['warmup_s']:.1f}s" for v, row in bench["variants"].items()))
junit = out / "pytest_cuda.xml"
if junit.is_file():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    summary["pytest_cuda"] = counts
    lines.append(f"pytest -m '{marks}': {counts}")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "gpu_check: $(($(date +%s) - START)) s in all; results in $OUT_DIR"
