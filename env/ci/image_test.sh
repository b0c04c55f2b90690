#!/usr/bin/env bash
# make test-image: build the real Dockerfile on a local Debian base, so no registry is needed, and test the
# image through compose's cpu service the way `make <target> RUNTIME=docker` runs it.
#   1. a Docker engine: Debian's docker.io, docker-compose and debootstrap are installed when missing, and
#      dockerd is started when none answers (one that answers is reused)
#   2. the base image torchrig-base:bookworm: debootstrap + docker import, skipped when it exists
#   3. the Dockerfile built with only BASE_IMAGE swapped, tagged torchrig:test-bookworm
#   4. in the container: non-root user, provenance labels, the torch/CUDA/NCCL versions, the fast tests,
#      make nccl-test GPUS=2 and a short make train GPUS=2, and a SIGKILLed launcher ends its workers there too
#   5. the build-time self-check rejects a wrong NCCL pin and a wrong CUDA pin
# Installing and starting Docker needs root. Every step runs and reports; the exit code says if any failed.
# DOCKER (default /usr/bin/docker, Debian's client with BuildKit built in) and COMPOSE choose the clients;
# CA_BUNDLE (default $PIP_CERT, else the system bundle) is the build's TLS bundle.
set -euo pipefail
cd "$(dirname "$0")/../.."

export DOCKER="${DOCKER:-/usr/bin/docker}"
export TORCHRIG_IMAGE=torchrig:test-bookworm  # compose runs this one; the user's torchrig:latest is left alone
base_image=torchrig-base:bookworm
mirror="${TORCHRIG_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ca_bundle="${CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
state=.build/image-test
mkdir -p "$state"

started=$SECONDS
failed=()
say() { printf '\n== image-test [%4d s]: %s\n' $((SECONDS - started)) "$*"; }
# step NAME COMMAND...: say what runs, time it, remember a failure and go on.
step() {
    local name="$1" begun=$SECONDS
    shift
    say "$name"
    if "$@"; then
        echo "-- ok: $name ($((SECONDS - begun)) s)"
    else
        echo "-- FAILED: $name ($((SECONDS - begun)) s)"
        failed+=("$name")
    fi
}

engine_answers() { timeout 10 "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

install_docker() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    [[ -x "$DOCKER" ]] || command -v "$DOCKER" >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if (( ${#missing[@]} == 0 )); then
        echo "Docker engine, docker-compose and debootstrap are installed"
        return 0
    fi
    if (( EUID != 0 )); then
        echo "missing ${missing[*]}: run as root, or: sudo apt-get install ${missing[*]}"
        return 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

start_engine() {
    if engine_answers; then
        echo "reusing the Docker engine that answers: $("$DOCKER" version --format '{{.Server.Version}}')"
        return 0
    fi
    if (( EUID != 0 )); then
        echo "no Docker engine answers and only root can start one: sudo systemctl start docker"
        return 1
    fi
    nohup dockerd >"$state/dockerd.log" 2>&1 &
    echo "started dockerd (pid $!, log $state/dockerd.log)"
    for _ in $(seq 60); do
        engine_answers && return 0
        sleep 1
    done
    echo "dockerd did not answer within 60 s; the end of its log:"
    tail -n 20 "$state/dockerd.log"
    return 1
}

make_base_image() {
    if "$DOCKER" image inspect "$base_image" >/dev/null 2>&1; then
        echo "$base_image exists; reusing it"
        return 0
    fi
    local rootfs
    rootfs=$(mktemp -d /var/tmp/torchrig-rootfs.XXXXXX)
    # shellcheck disable=SC2064  # expand now: the trap must remove this directory
    trap "rm -rf '$rootfs'" RETURN
    debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv bookworm "$rootfs" "$mirror"
    tar -C "$rootfs" -c . | "$DOCKER" import - "$base_image"
}

build_test_image() {
    python3 -m env.rig.docker build --base-image "$base_image" --tag "$TORCHRIG_IMAGE" --ca-bundle "$ca_bundle" \
        -- --network host
}

# docker-compose.yml asks for memlock=-1 (unlimited), which an engine without CAP_SYS_RESOURCE (a sandbox,
# rootless Docker) cannot grant. There, and only there, the test lowers it to the engine's own limit in an
# extra compose file named by COMPOSE_FILE, and says so.
engine_limits() {
    if "$DOCKER" run --rm --ulimit memlock=-1 "$TORCHRIG_IMAGE" true >/dev/null 2>&1; then
        echo "the engine grants memlock=-1, as docker-compose.yml asks"
        return 0
    fi
    local memlock_bytes=$(( $(ulimit -H -l) * 1024 ))
    {
        echo "services:"
        printf '  %s:\n    ulimits:\n      memlock: %s\n' cpu "$memlock_bytes" gpu "$memlock_bytes"
    } >"$state/compose.engine-limits.yml"
    export COMPOSE_FILE="docker-compose.yml:$state/compose.engine-limits.yml"
    echo "this engine cannot raise memlock to unlimited (no CAP_SYS_RESOURCE); testing with memlock=$memlock_bytes"
    echo "COMPOSE_FILE=$COMPOSE_FILE"
}

# Commands in the container are bounded, so a hung job fails its step instead of eating CI's time.
step_limit_s=900
in_container() { timeout --kill-after=30 "$step_limit_s" python3 -m env.rig.docker run -- "$@"; }
bounded_make() { timeout --kill-after=30 "$step_limit_s" make "$@"; }

# A job killed by its time limit can leave its container behind.
remove_leftover_containers() {
    local leftovers
    leftovers=$("$DOCKER" ps -q --filter "ancestor=$TORCHRIG_IMAGE")
    if [[ -n "$leftovers" ]]; then
        echo "removing containers left running: $leftovers"
        # shellcheck disable=SC2086  # one id per word
        "$DOCKER" rm -f $leftovers >/dev/null
    fi
}

runs_as_non_root() {
    local image_user compose_user
    image_user=$("$DOCKER" run --rm "$TORCHRIG_IMAGE" id -u) || return 1
    compose_user=$(in_container id -u | tr -d '\r') || return 1
    echo "image user: uid $image_user; through compose: uid $compose_user"
    [[ "$image_user" == 1000 && "$compose_user" =~ ^[0-9]+$ && "$compose_user" != 0 ]]
}

labels_name_the_checkout() {
    local revision profile
    revision=$("$DOCKER" image inspect --format '{{index .Config.Labels "org.opencontainers.image.revision"}}' \
        "$TORCHRIG_IMAGE") || return 1
    profile=$(in_container printenv TORCHRIG_CUDA_PROFILE | tr -d '\r') || return 1
    echo "org.opencontainers.image.revision=$revision, TORCHRIG_CUDA_PROFILE=$profile"
    [[ "$revision" == "$built_from" && "$profile" == "$(python3 -m env.rig.profiles show 12.1 --field cuda)" ]]
}

# Workers end when their launcher dies, on every runtime. Under RUNTIME=docker the launcher runs in the
# container; this SIGKILLs it from the host (container processes are the host's too) mid-run and waits for
# every worker of that run to end, then for make to fail and the container to go. (A SIGKILL of the host's
# compose client instead leaves the container to the engine: the README says so.)
killed_launcher_takes_its_workers() {
    local run_dir=runs/image-test-kill log="$state/kill.log" make_pid launcher="" waited
    rm -rf "$run_dir"
    TORCHRIG_TEST_STEP_SLEEP=0.5 timeout --kill-after=30 "$step_limit_s" make train GPUS=2 RUNTIME=docker \
        CONFIG=tiny STEPS=200 RUN_DIR="$run_dir" ARGS=train.log_every=1 >"$log" 2>&1 &
    make_pid=$!
    for waited in $(seq 600); do
        grep -q '"step": 2,' "$run_dir/metrics.jsonl" 2>/dev/null && break
        kill -0 "$make_pid" 2>/dev/null || { echo "make ended before step 2:"; tail -n 20 "$log"; return 1; }
        sleep 0.5
    done
    # The launcher itself: a python command line (not the compose client's, nor docker-init's, which name it too).
    launcher=$(pgrep -f -- "^([^ ]*/)?python[0-9.]* -m train.launch .*--run-dir=[^ ]*image-test-kill" | head -n 1)
    [[ -n "$launcher" ]] || { echo "no launcher process found for $run_dir"; pgrep -af train || true; return 1; }
    echo "step 2 after ${waited} polls; SIGKILL to the launcher (host pid $launcher)"
    kill -KILL "$launcher"
    for waited in $(seq 60); do
        pgrep -f -- "-m train.worker .*image-test-kill" >/dev/null || break
        sleep 1
    done
    if pgrep -f -- "-m train.worker .*image-test-kill" >/dev/null; then
        echo "workers still running 60 s after their launcher was killed:"
        pgrep -af -- "-m train.worker"
        return 1
    fi
    echo "every worker ended within ${waited} s"
    if wait "$make_pid"; then
        echo "make exited 0 after its launcher was killed"
        return 1
    fi
    [[ -z "$("$DOCKER" ps -q --filter "ancestor=$TORCHRIG_IMAGE")" ]] || { echo "a container is left running"; return 1; }
    echo "make failed as it should, and no container is left; the end of its output:"
    tail -n 3 "$log"
}

image_versions() {
    in_container python -c 'import torch, torchvision, torchaudio
print("torch", torch.__version__, "| torchvision", torchvision.__version__, "| torchaudio", torchaudio.__version__)
print("CUDA (torch.version.cuda)", torch.version.cuda, "| NCCL", ".".join(map(str, torch.cuda.nccl.version()[:3])))'
}

# A wrong pin must fail the build in the self-check, not anywhere else: the layer cache makes this cheap.
rejects_wrong_pin() {
    local pin="$1" log="$state/wrong-pin.log"
    if python3 -m env.rig.docker build --base-image "$base_image" --tag torchrig:test-wrong-pin --ca-bundle "$ca_bundle" \
        -- --network host --progress plain --build-arg "$pin" >"$log" 2>&1; then
        echo "the build with $pin succeeded; the self-check should have failed it"
        return 1
    fi
    grep -m 3 "self-check FAILED" "$log" || { echo "the build failed elsewhere:"; tail -n 20 "$log"; return 1; }
}

step "install Docker from Debian's packages if missing" install_docker
step "a Docker engine that answers" start_engine
if (( ${#failed[@]} )); then
    echo "image-test: no Docker engine, nothing more can run"
    exit 1
fi
step "base image $base_image (debootstrap bookworm)" make_base_image
built_from=$(git rev-parse HEAD)
step "build the Dockerfile on $base_image as $TORCHRIG_IMAGE" build_test_image
if [[ " ${failed[*]} " == *" build "* ]] || ! "$DOCKER" image inspect "$TORCHRIG_IMAGE" >/dev/null 2>&1; then
    echo "image-test: no image to test"
    exit 1
fi
step "memlock: what this engine can grant" engine_limits
step "the container runs as the non-root user" runs_as_non_root
step "labels and variables name the checkout and profile" labels_name_the_checkout
step "torch, CUDA and NCCL in the image" image_versions
step "test suite in the image (-m 'not slow')" in_container python -m pytest -q -p no:cacheprovider -m "not slow"
step "make nccl-test GPUS=2 RUNTIME=docker" bounded_make nccl-test GPUS=2 RUNTIME=docker
step "make train GPUS=2 RUNTIME=docker (short)" bounded_make train GPUS=2 RUNTIME=docker CONFIG=tiny STEPS=6 \
    RUN_DIR=runs/image-test
step "a SIGKILLed launcher in the container takes its workers along" killed_launcher_takes_its_workers
remove_leftover_containers
step "the self-check rejects a wrong NCCL pin" rejects_wrong_pin TORCHRIG_NCCL=2.99.9
step "the self-check rejects a wrong CUDA pin" rejects_wrong_pin TORCHRIG_CUDA=12.8

say "done"
if (( ${#failed[@]} )); then
    printf 'image-test: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "image-test: all steps passed"
