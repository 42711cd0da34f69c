#!/usr/bin/env bash
# Prepares the outlier-study sweep (benchmarks/sweeps/oal-study.toml): the embedded generator and the
# outlier jobs it needs, synthesised through the real API and a worker. Reuses what exists.
#
#   bash benchmarks/study/prepare.sh [OUT]      (default OUT: runs/study)
#
# Leaves OUT/artifacts/generators/fmnist-ldm and, per job, a stable link OUT/shards-<name> to the job
# folder, so the sweep file can name them. Jobs: 600 outliers (the demo's, 100 per class), the same
# with the reference's k-NN indexing bug, 60/150/2400 for outlier efficiency, and "sharp" (600 from a
# longer-trained generator); STUDY_JOBS="600" makes only the first. STUDY_JOBS="600-sigma0.015" makes
# the 600-outlier job with the sampler's sigma at 0.015 (any value after "600-sigma").
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=$(realpath -m "${1:-runs/study}")
BIN=${OAL_BIN:-$(dirname "$(command -v python)")}
PY=${PYTHON:-python}
mkdir -p "$OUT/logs"
export OAL_ARTIFACT_DIR="$OUT/artifacts" OAL_GENERATOR_ROOT="$OUT/artifacts/generators" OAL_SHARD_ROOT="$OUT/shards"
export OAL_REDIS_URL=${OAL_REDIS_URL:-redis://127.0.0.1:6379/12} OAL_QUEUE_NAME=${OAL_QUEUE_NAME:-oal-study}
export OAL_TORCH_THREADS=${OAL_TORCH_THREADS:-1}
GEN="$OAL_GENERATOR_ROOT/fmnist-ldm"

if [ ! -f "$GEN/oal_generator.json" ]; then
    echo "study: pretraining the embedded generator (demo preset)"
    "$PY" -m oal_synth.cli pretrain --preset demo --out "$GEN"
fi

API="" WORKER=""
start_services() {  # an API and a worker over the current OAL_GENERATOR_ROOT / OAL_SHARD_ROOT
    PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PY" -m oal_synth.cli serve --port "$PORT" >> "$OUT/logs/api.log" 2>&1 &
    API=$!
    "$PY" -m oal_synth.cli worker >> "$OUT/logs/worker.log" 2>&1 &
    WORKER=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.3; done
}
stop_services() { kill $API $WORKER 2>/dev/null || true; wait $API $WORKER 2>/dev/null || true; }
trap stop_services EXIT
start_services

job() {  # job NAME NUM_OUTLIERS FAITHFUL_BUG [LINK] [SIGMA]
    local name=$1 count=$2 bug=$3 link=${4:-"$OUT/shards-$1"} sigma=${5:+", \"sigma\": $5"}
    if [ -L "$link" ] && [ -f "$link/manifest.json" ]; then echo "study: $name ready"; return; fi
    local spec="$OUT/logs/job-$name.json"
    cat > "$spec" <<JSON
{"generator": "fmnist-ldm", "embeddings": {"benchmark": "fmnist-osr"}, "num_outliers": $count, "seed": 0,
 "sampler": {"faithful_knn_bug": $bug$sigma}, "diffusion": {"steps": 25, "guidance_scale": 3.0}}
JSON
    echo "study: job $name ($count outliers, faithful_knn_bug=$bug)"
    # submit follows the job to its end and prints the manifest path as its last line
    "$PY" -m oal_synth.cli submit "$spec" --url "http://127.0.0.1:$PORT" > "$OUT/logs/job-$name.out"
    local manifest
    manifest=$(tail -n 1 "$OUT/logs/job-$name.out")
    ln -sfn "$(dirname "$manifest")" "$link"
    echo "study: $name -> $link"
}
for name in ${STUDY_JOBS:-600 600-faithful 60 150 2400 sharp}; do
    case $name in
        600-faithful) job "$name" 600 true ;;
        600-sigma*) job "$name" 600 false "" "${name#600-sigma}" ;;  # the sampler's noise scale (default 0.07)
        sharp) ;;  # below: another generator root
        *) job "$name" "$name" false ;;
    esac
done
stop_services

# The sharper generator (docs/GENERATOR.md, Outlier quality): the demo preset trained longer, in a
# root of its own (OUT/sharp/fmnist-ldm), and the 600-outlier job on it (OUT/sharp/shards-600).
if [[ " ${STUDY_JOBS:-sharp} " == *" sharp "* ]]; then
    export OAL_GENERATOR_ROOT="$OUT/sharp" OAL_SHARD_ROOT="$OUT/sharp/shards"
    if [ ! -f "$OUT/sharp/fmnist-ldm/oal_generator.json" ]; then
        echo "study: pretraining the sharper generator (vae_steps=520, unet_steps=520)"
        "$PY" -m oal_synth.cli pretrain --preset demo --set vae_steps=520 --set unet_steps=520 --out "$OUT/sharp/fmnist-ldm"
    fi
    start_services
    job sharp-600 600 false "$OUT/sharp/shards-600"
    stop_services
fi
echo "study: ready in $OUT"
