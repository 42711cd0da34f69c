#!/usr/bin/env bash
# `make compose-check`: build the images and run the compose pipeline end to end (CPU profile).
#
# Engines: `docker compose` where a Docker engine answers; otherwise podman, driven by docker-compose
# (>= 1.28, for profiles and healthy-dependency waits) or the `docker compose` plugin through
# `podman system service`. Steps (each timed; docs/DEPLOY.md has the numbers):
#   bases    pull python:3.11-slim-bookworm, debian:bookworm-slim, redis:7.4-alpine, or build stand-ins
#            (docker/standin/build-base-images.sh) and pass them in through the base-image build args
#   build    api, dashboard, worker-cpu, trainer-cpu (+ worker-gpu, trainer-gpu with OAL_CHECK_GPU=1)
#   up       redis, api, dashboard, worker-cpu healthy
#   pretrain the embedded generator, in the worker container (--preset smoke)
#   job      submitted from the host over REST to the published port, followed to `finished`; shards
#            copied to the host and checked (count, bytes, sha256 against the manifest, no key twice)
#   kill     a second job; the worker container killed mid-job (`ENGINE kill`); the job finishes on the
#            restarted container with the exact count
#   train    trainer-cpu: a smoke `ce` run, then a smoke `oal` run on the job's shards (shared volume)
#   checks   the dashboard answers, the api has no torch, every container runs as a non-root user
#   down     `down -v`; no container, volume or network of the project is left
# Settings (environment): OAL_CHECK_PROJECT (oal-check), IMAGE_TAG (dev), OAL_CHECK_GPU (0),
# OAL_CHECK_KILL=crash (kill -9 the worker's first process from the host instead of `ENGINE kill`),
# OAL_CHECK_KEEP=1 (leave the project up at the end or on failure), OAL_CHECK_SKIP_BUILD=1 (use built
# images), OAL_BUILD_CA_BUNDLE (CA bundle pip needs inside podman builds; default $PIP_CERT, then
# $SSL_CERT_FILE), OAL_ENGINE (docker|podman), OAL_COMPOSE (the compose command to use).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PROJECT=${OAL_CHECK_PROJECT:-oal-check}
export IMAGE_TAG=${IMAGE_TAG:-dev}
WORK="$ROOT/.run/compose-check"
CHECK_DIR="$ROOT/docker/check"
STANDIN_PREFIX=localhost/oal-standin
CPU_TARGETS=(api dashboard worker-cpu trainer-cpu)
GPU_TARGETS=(worker-gpu trainer-gpu)
# The first job: small and quick; the second runs long enough on the smoke generator to be killed mid-way.
JOB_OUTLIERS=${OAL_CHECK_OUTLIERS:-240}
KILL_OUTLIERS=${OAL_CHECK_KILL_OUTLIERS:-300}
KILL_SHARD=50
STARTED=$SECONDS
STEP_STARTED=$SECONDS
TIMINGS=()

log() { printf '[compose-check %4ds] %s\n' $((SECONDS - STARTED)) "$*"; }
die() {
    printf '[compose-check] FAILED: %s\n' "$*" >&2
    exit 1
}
step() {
    finish_step
    STEP_NAME=$1
    STEP_STARTED=$SECONDS
    log "== $1"
}
finish_step() {
    if [[ -n ${STEP_NAME:-} ]]; then
        TIMINGS+=("$(printf '%-9s %5d s' "$STEP_NAME" $((SECONDS - STEP_STARTED)))")
    fi
    STEP_NAME=
}

# ---------------------------------------------------------------- engine and compose

choose_engine() {
    if [[ -n ${OAL_ENGINE:-} ]]; then
        ENGINE=$OAL_ENGINE
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif command -v podman >/dev/null; then
        ENGINE=podman
    else
        die "neither a Docker engine nor podman is available"
    fi
    log "engine: $ENGINE ($($ENGINE --version))"
}

start_podman_service() {
    # docker-compose talks to podman through its Docker-compatible API on a private socket.
    mkdir -p "$WORK"
    local socket="$WORK/podman.sock"
    rm -f "$socket"
    podman system service --time=0 "unix://$socket" >"$WORK/podman-service.log" 2>&1 &
    PODMAN_SERVICE_PID=$!
    export DOCKER_HOST="unix://$socket"
    for _ in $(seq 50); do
        [[ -S $socket ]] && return
        sleep 0.2
    done
    die "podman system service did not open $socket (see $WORK/podman-service.log)"
}

choose_compose() {
    if [[ -n ${OAL_COMPOSE:-} ]]; then
        read -r -a COMPOSE <<<"$OAL_COMPOSE"
    elif [[ $ENGINE == docker ]]; then
        COMPOSE=(docker compose)
    else
        start_podman_service
        if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
            COMPOSE=(docker compose)
        elif command -v docker-compose >/dev/null; then
            COMPOSE=(docker-compose)
        else
            die "podman needs a compose front end: apt-get install -y docker-compose (1.29; podman-compose 1.0.3 lacks profiles)"
        fi
    fi
    local version
    version=$("${COMPOSE[@]}" version --short 2>/dev/null || true)
    log "compose: ${COMPOSE[*]} ${version:-(version unknown)}"
    local file=docker-compose.yml
    if [[ $version == 1.* ]]; then
        # docker-compose 1.x predates the top-level `name:`; the rest of the file it reads as it is.
        file="$WORK/docker-compose.v1.yml"
        sed '/^name:/d' docker-compose.yml >"$file"
        COMPOSE+=(--project-directory "$ROOT")
    fi
    COMPOSE+=(-p "$PROJECT" -f "$file" --profile cpu --profile train-cpu)
}

compose() { "${COMPOSE[@]}" "$@"; }

# Container of a compose service (compose v1 and v2 both label them).
cid() {
    "$ENGINE" ps -q --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" | head -n 1
}

# podman runs healthchecks from systemd timers; where there is no systemd (containers, CI sandboxes)
# nothing runs them, the status stays `starting` and compose waits for ever. This loop runs them.
start_health_ticker() {
    [[ $ENGINE == podman ]] || return 0
    (
        while sleep 3; do
            for id in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
                podman healthcheck run "$id" >/dev/null 2>&1 || true
            done
        done
    ) &
    HEALTH_TICKER_PID=$!
}

health_of() { "$ENGINE" inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$1" 2>/dev/null; }

wait_healthy() {
    local deadline=$((SECONDS + ${WAIT_S:-300})) service id state
    for service in "$@"; do
        while :; do
            id=$(cid "$service")
            state=$([[ -n $id ]] && health_of "$id" || echo absent)
            [[ $state == healthy ]] && break
            ((SECONDS < deadline)) || die "$service is $state after ${WAIT_S:-300} s"
            sleep 2
        done
        log "$service healthy"
    done
}

# ---------------------------------------------------------------- images

image_available() {
    "$ENGINE" image inspect "$1" >/dev/null 2>&1 || timeout 120 "$ENGINE" pull -q "$1" >/dev/null 2>&1
}

ensure_bases() {
    local missing=()
    image_available "${PYTHON_IMAGE:-python:3.11-slim-bookworm}" || missing+=(PYTHON_IMAGE)
    image_available "${DEBIAN_IMAGE:-debian:bookworm-slim}" || missing+=(DEBIAN_IMAGE)
    image_available "${REDIS_IMAGE:-redis:7.4-alpine}" || missing+=(REDIS_IMAGE)
    if [[ ${OAL_CHECK_GPU:-0} == 1 ]]; then
        image_available "${CUDA_IMAGE:-nvidia/cuda:13.0.0-runtime-ubuntu24.04}" || missing+=(CUDA_IMAGE)
    fi
    if ((${#missing[@]})); then
        log "cannot pull ${missing[*]}: building stand-in bases"
        bash docker/standin/build-base-images.sh "$ENGINE" "$STANDIN_PREFIX"
        for name in "${missing[@]}"; do
            if [[ $name == REDIS_IMAGE ]]; then
                export REDIS_IMAGE="$STANDIN_PREFIX/redis:7"
            else
                export "$name=$STANDIN_PREFIX/bookworm-py:12"
            fi
        done
    fi
    log "bases: PYTHON_IMAGE=${PYTHON_IMAGE:-default} DEBIAN_IMAGE=${DEBIAN_IMAGE:-default}" \
        "REDIS_IMAGE=${REDIS_IMAGE:-default} CUDA_IMAGE=${CUDA_IMAGE:-default}"
}

build_arguments() {
    BUILD_ARGS=()
    local name
    for name in PYTHON_IMAGE DEBIAN_IMAGE CUDA_IMAGE TORCH_INDEX_URL; do
        [[ -n ${!name:-} ]] && BUILD_ARGS+=(--build-arg "$name=${!name}")
    done
    # pip inside a podman build trusts only the base image's CAs; behind an intercepting proxy it needs
    # this machine's bundle, mounted for the build only (not in any layer) with a pip.conf naming it.
    local bundle=${OAL_BUILD_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}
    if [[ $ENGINE == podman && -n $bundle && -f $bundle ]]; then
        mkdir -p "$WORK/build"
        cp "$bundle" "$WORK/build/ca.crt"
        printf '[global]\ncert = /etc/ssl/oal-build-ca.crt\n' >"$WORK/build/pip.conf"
        BUILD_ARGS+=(-v "$WORK/build/ca.crt:/etc/ssl/oal-build-ca.crt:ro" -v "$WORK/build/pip.conf:/etc/pip.conf:ro")
    fi
}

build_images() {
    build_arguments
    local target started
    for target in "$@"; do
        started=$SECONDS
        "$ENGINE" build -f docker/Dockerfile --target "$target" -t "oal/$target:$IMAGE_TAG" "${BUILD_ARGS[@]}" . \
            >"$WORK/build-$target.log" 2>&1 || {
            tail -n 30 "$WORK/build-$target.log" >&2
            die "building $target (log: $WORK/build-$target.log)"
        }
        log "built oal/$target:$IMAGE_TAG in $((SECONDS - started)) s, $(image_size "oal/$target:$IMAGE_TAG")"
    done
}

image_size() { "$ENGINE" image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1 / 1e9}'; }

# ---------------------------------------------------------------- REST from the host

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

json_get() { python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {"d": d}))' "$@"; }

submit_job() { # NUM_OUTLIERS SHARD_SIZE -> job id
    local body="$WORK/job-request.json"
    cat >"$body" <<EOF
{"generator": "fmnist-ldm", "embeddings": {"benchmark": "fmnist-osr", "per_class": 60}, "num_outliers": $1,
 "seed": 0, "sampler": {"k": 20, "select": 10, "n_candidates": 200, "keep": 2},
 "diffusion": {"scheduler": "ddim", "steps": 10, "batch_size": 64}, "shards": {"max_samples": $2}}
EOF
    curl -sf -X POST "$API/v1/jobs" -H 'content-type: application/json' --data-binary "@$body" -o "$WORK/job.json" ||
        die "POST $API/v1/jobs refused the job: $(curl -s -X POST "$API/v1/jobs" -H 'content-type: application/json' --data-binary "@$body")"
    json_get "$WORK/job.json" 'd["id"]'
}

job_field() { curl -sf "$API/v1/jobs/$1" -o "$WORK/job-$1.json" && json_get "$WORK/job-$1.json" "$2"; }

follow_job() { # JOB_ID TIMEOUT_S
    local deadline=$((SECONDS + $2)) status
    while :; do
        status=$(job_field "$1" 'd["status"]') || status=unreachable
        case $status in
            finished) return 0 ;;
            failed | canceled | stopped) die "job $1 is $status: $(json_get "$WORK/job-$1.json" 'd["error"]')" ;;
        esac
        ((SECONDS < deadline)) || die "job $1 is still $status after $2 s"
        sleep 2
    done
}

check_shards() { # JOB_ID EXPECTED_COUNT
    curl -sf "$API/v1/jobs/$1/manifest" -o "$WORK/manifest-$1.json" || die "GET /v1/jobs/$1/manifest failed"
    rm -rf "$WORK/shards-$1"
    "$ENGINE" cp "$(cid worker-cpu):/srv/oal/shards/$1" "$WORK/shards-$1" >/dev/null
    python3 "$CHECK_DIR/verify_shards.py" "$WORK/shards-$1" "$WORK/manifest-$1.json" "$2"
}

# ---------------------------------------------------------------- the steps

kill_worker_mid_job() {
    local job total done_count worker restarted=policy
    job=$(submit_job "$KILL_OUTLIERS" "$KILL_SHARD")
    log "job $job ($KILL_OUTLIERS outliers): waiting for its first shard"
    local deadline=$((SECONDS + 300))
    while :; do
        done_count=$(job_field "$job" 'd["progress"]["done"]')
        total=$(job_field "$job" 'd["progress"]["total"]')
        [[ $(job_field "$job" 'd["status"]') == finished ]] &&
            die "job $job finished before the kill; raise OAL_CHECK_KILL_OUTLIERS"
        ((done_count >= KILL_SHARD && done_count < total)) && break
        ((SECONDS < deadline)) || die "job $job made no progress in 300 s"
        sleep 0.5
    done
    worker=$(cid worker-cpu)
    if [[ ${OAL_CHECK_KILL:-engine} == crash ]]; then
        # SIGKILL to the container's first process from the host: what an OOM kill or a crash does.
        kill -9 "$("$ENGINE" inspect -f '{{.State.Pid}}' "$worker")"
        log "kill -9 of the worker container's init at $done_count/$total"
    else
        "$ENGINE" kill "$worker" >/dev/null
        log "'$ENGINE kill' of the worker container at $done_count/$total"
    fi
    # restart: unless-stopped brings a crashed container back. podman (4.3) counts `podman kill` as a
    # stop by the user and does not; then a plain start, as an operator would do.
    for _ in $(seq 15); do
        sleep 2
        [[ $("$ENGINE" inspect -f '{{.State.Running}}' "$worker") == true ]] && break
    done
    if [[ $("$ENGINE" inspect -f '{{.State.Running}}' "$worker") != true ]]; then
        restarted="'$ENGINE start' (the restart policy did not bring it back)"
        "$ENGINE" start "$worker" >/dev/null 2>>"$WORK/engine-errors.log"
    fi
    log "worker container running again, by $restarted"
    wait_healthy worker-cpu
    follow_job "$job" 600
    log "job $job finished on the restarted container; retries left: $(job_field "$job" 'd["retries_left"]')"
    check_shards "$job" "$KILL_OUTLIERS"
}

train_on_shards() { # JOB_ID
    compose run --rm -T trainer-cpu fit --recipe ce --out /srv/oal/runs/ce --preset smoke
    compose run --rm -T trainer-cpu fit --recipe oal --out /srv/oal/runs/oal --preset smoke \
        --set teacher_run=/srv/oal/runs/ce --set init_from=/srv/oal/runs/ce --set "shards=/srv/oal/shards/$1"
    compose run --rm -T --entrypoint ls trainer-cpu /srv/oal/runs/oal >"$WORK/oal-run.txt"
    for file in config.json model.safetensors metrics.json results.csv; do
        grep -qx "$file" "$WORK/oal-run.txt" || die "the oal run dir lacks $file: $(tr '\n' ' ' <"$WORK/oal-run.txt")"
    done
    compose run --rm -T --entrypoint cat trainer-cpu /srv/oal/runs/oal/metrics.json >"$WORK/oal-metrics.json"
    log "oal run: $(tr '\n' ' ' <"$WORK/oal-run.txt")"
    log "oal metrics: $(python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1])))[:300])' \
        "$WORK/oal-metrics.json")"
}

check_containers() {
    curl -sf "$DASHBOARD/" -o "$WORK/dashboard.html" || die "the dashboard at $DASHBOARD/ did not answer"
    grep -qi "rq dashboard" "$WORK/dashboard.html" || die "$DASHBOARD/ answered without the RQ dashboard page"
    log "dashboard answers at $DASHBOARD/"
    "$ENGINE" exec "$(cid api)" python -c \
        'import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) for m in ("torch", "diffusers")))' ||
        die "the api container can import torch or diffusers"
    log "api container: no torch, no diffusers"
    local service uid
    for service in redis api dashboard worker-cpu; do
        # PID 1's uid: the init (or redis-server itself) runs as the image's user.
        uid=$("$ENGINE" exec "$(cid "$service")" sh -c 'awk "/^Uid:/ {print \$2}" /proc/1/status')
        [[ $uid != 0 ]] || die "$service runs as root"
        log "$service runs as uid $uid"
    done
    uid=$(compose run --rm -T --entrypoint id trainer-cpu -u)
    [[ $uid != 0 ]] || die "trainer-cpu runs as root"
    log "trainer-cpu runs as uid $uid"
}

check_nothing_left() {
    local left
    left=$(
        "$ENGINE" ps -aq --filter "label=com.docker.compose.project=$PROJECT"
        "$ENGINE" volume ls -q | grep -E "^${PROJECT}_" || true
        "$ENGINE" network ls --format '{{.Name}}' | grep -E "^${PROJECT}_" || true
    )
    [[ -z $left ]] || die "left behind after down -v: $(echo "$left" | tr '\n' ' ')"
    log "down -v left no container, volume or network of $PROJECT"
}

cleanup() {
    local rc=$?
    if ((rc != 0)) && [[ -n ${COMPOSE[*]:-} ]]; then
        compose logs --tail 40 >"$WORK/compose-logs.txt" 2>&1 || true
        echo "[compose-check] last log lines of each service: $WORK/compose-logs.txt" >&2
    fi
    if [[ ${OAL_CHECK_KEEP:-0} != 1 && ${PROJECT_UP:-0} == 1 ]]; then
        compose down -v --remove-orphans >/dev/null 2>&1 || true
    fi
    [[ -n ${HEALTH_TICKER_PID:-} ]] && kill "$HEALTH_TICKER_PID" 2>/dev/null
    [[ -n ${PODMAN_SERVICE_PID:-} ]] && kill "$PODMAN_SERVICE_PID" 2>/dev/null
    exit "$rc"
}

main() {
    mkdir -p "$WORK"
    choose_engine
    choose_compose
    trap cleanup EXIT
    step bases
    ensure_bases
    if [[ ${OAL_CHECK_SKIP_BUILD:-0} != 1 ]]; then
        step build
        build_images "${CPU_TARGETS[@]}"
        [[ ${OAL_CHECK_GPU:-0} == 1 ]] && build_images "${GPU_TARGETS[@]}"
    fi

    step up
    API_PORT=$(free_port) DASHBOARD_PORT=$(free_port)
    export API_PORT DASHBOARD_PORT API_BIND=127.0.0.1 DASHBOARD_BIND=127.0.0.1
    API="http://127.0.0.1:$API_PORT" DASHBOARD="http://127.0.0.1:$DASHBOARD_PORT"
    compose down -v --remove-orphans >/dev/null 2>&1 || true # a previous run's leftovers
    start_health_ticker
    PROJECT_UP=1
    compose up -d --no-build redis api dashboard worker-cpu
    wait_healthy redis api dashboard worker-cpu

    step pretrain
    "$ENGINE" exec "$(cid worker-cpu)" oal-synth pretrain --preset smoke
    curl -sf "$API/v1/generators" | grep -q '"fmnist-ldm"' || die "GET /v1/generators does not list fmnist-ldm"

    step job
    JOB=$(submit_job "$JOB_OUTLIERS" 64)
    log "job $JOB submitted to $API"
    follow_job "$JOB" 600
    check_shards "$JOB" "$JOB_OUTLIERS"

    step kill
    kill_worker_mid_job

    step train
    train_on_shards "$JOB"

    step checks
    check_containers

    step down
    compose down -v --remove-orphans
    PROJECT_UP=0
    check_nothing_left
    finish_step

    log "passed in $((SECONDS - STARTED)) s"
    printf '  %s\n' "${TIMINGS[@]}"
    local targets=("${CPU_TARGETS[@]}")
    [[ ${OAL_CHECK_GPU:-0} == 1 ]] && targets+=("${GPU_TARGETS[@]}")
    for target in "${targets[@]}"; do
        "$ENGINE" image inspect "oal/$target:$IMAGE_TAG" >/dev/null 2>&1 &&
            printf '  oal/%s:%s %s\n' "$target" "$IMAGE_TAG" "$(image_size "oal/$target:$IMAGE_TAG")"
    done
}

main "$@"
