#!/usr/bin/env bash
# torchrig cloud VM bootstrap: a bare Ubuntu 22.04/24.04 x86-64 GPU VM to a verified rig.
#
#   sudo bash env/cloud/bootstrap.sh [--dry-run] [--yes] [--no-reboot]
#
#   --dry-run    print every step it would take and change nothing (no log file, no lock, no state)
#   --yes        may reboot when a step needs it; the run then resumes after the boot
#   --no-reboot  never reboot, even with --yes
#
# Steps: 0 preflight (root, release, x86-64, an NVIDIA device in lspci, one instance at a time),
# 1 driver (the pinned -server branch through ubuntu-drivers unless nvidia-smi already reports at least
# the CUDA profile's minimum; packages held), 2 Docker Engine + compose plugin from Docker's apt
# repository, 3 the NVIDIA Container Toolkit (pinned) and the engine's nvidia runtime, 4 verify (a GPU
# container sees every GPU lspci lists; make build, make doctor, make nccl-test). Each step checks
# first and says "unchanged" when there is nothing to do, so a second run changes nothing.
#
# Exit codes:
#   0  ready: every step done and verified
#   1  failure: the line before names the failure mode and its fix
#   2  usage: an unknown option, or a CUDA= with no profile
#   3  reboot required: rerun after a reboot, or pass --yes to reboot and resume automatically
#   4  unsupported: not Ubuntu 22.04/24.04, or not x86-64 (arm64 is not supported yet)
#   --dry-run exits 0 after printing its plan, or with the preflight's code (4 on another release).
#
# Every change goes through act(); the failure modes are one table (FAILURE_MODES) that diagnose() walks.
# Tests point every system path below TORCHRIG_BOOTSTRAP_ROOT and put stub commands on PATH.
set -euo pipefail
# apt, ubuntu-drivers and needrestart (Ubuntu 22.04) would otherwise stop to ask.
export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a

# ---- pins -------------------------------------------------------------------------------------------
DRIVER_BRANCH=570                       # -server branch; >= every CUDA profile's min_driver (env/rig/profiles.py)
DOCKER_VERSION=27.5.1                   # docker-ce and docker-ce-cli, from download.docker.com
NVIDIA_CTK_VERSION=1.17.8-1             # nvidia-container-toolkit and its three libraries
DOCKER_APT_URL=https://download.docker.com/linux/ubuntu
NVIDIA_APT_URL=https://nvidia.github.io/libnvidia-container
SUPPORTED_RELEASES="22.04 24.04"

# ---- paths (overridable for tests) -----------------------------------------------------------------
ROOT=${TORCHRIG_BOOTSTRAP_ROOT:-}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SCRIPT="$REPO/env/cloud/bootstrap.sh"
STATE_DIR=${TORCHRIG_BOOTSTRAP_STATE:-$ROOT/var/lib/torchrig-bootstrap}
LOG_FILE=${TORCHRIG_BOOTSTRAP_LOG:-$ROOT/var/log/torchrig-bootstrap.log}
OS_RELEASE=$ROOT/etc/os-release
APT_SOURCES=$ROOT/etc/apt
DOCKER_KEY=$ROOT/etc/apt/keyrings/docker.asc
DOCKER_LIST=$ROOT/etc/apt/sources.list.d/docker.list
NVIDIA_KEY=$ROOT/etc/apt/keyrings/nvidia-container-toolkit.asc
NVIDIA_LIST=$ROOT/etc/apt/sources.list.d/nvidia-container-toolkit.list
RESUME_UNIT_NAME=torchrig-bootstrap-resume.service
RESUME_UNIT=$ROOT/etc/systemd/system/$RESUME_UNIT_NAME
PROC_MODULES=$ROOT/proc/modules
BOOT_ID_FILE=$ROOT/proc/sys/kernel/random/boot_id
# Steps to run, for tests and for rerunning one step: any of driver docker toolkit verify.
ONLY_STEPS=${TORCHRIG_BOOTSTRAP_ONLY:-driver docker toolkit verify}

# ---- failure modes: name | exit code | evidence | fix ---------------------------------------------------
# Evidence: extended regexes, separated by ";", matched against the failing command's output and the facts
# that probes add ("fact: ..."). The first row that matches wins, so specific rows come before general ones.
# In a fix, DRIVER is the pinned branch and {source} the apt source file that holds the failing URL.
# Docker names the driver "" for --gpus (seen on Docker 20.10) and "nvidia" elsewhere: both match.
FAILURE_MODES=$(cat <<'TABLE'
toolkit-missing|1|could not select device driver "[^"]*" with capabilities: \[\[gpu\]\]|the NVIDIA Container Toolkit is missing or the engine was not restarted after it was configured: apt-get install nvidia-container-toolkit, then nvidia-ctk runtime configure --runtime=docker and systemctl restart docker (rerunning this script does all three)
snap-docker|1|^fact: docker is the snap package|Docker from snap cannot use the NVIDIA runtime: sudo snap remove --purge docker, then rerun this script (it installs Docker Engine from Docker's apt repository)
version-mismatch|3|Failed to initialize NVML: Driver/library version mismatch|the driver libraries were upgraded under a loaded kernel module: reboot (sudo reboot, or rerun with --yes to reboot and resume); the driver packages are held afterwards so unattended upgrades cannot do it again
nvml-lost|1|Failed to initialize NVML: Unknown Error|a running container lost its GPUs after systemctl daemon-reload (systemd cgroup driver): delete and recreate the container; to stop it recurring, run nvidia-ctk system create-dev-char-symlinks --create-all at every boot, or set "exec-opts": ["native.cgroupdriver=cgroupfs"] in /etc/docker/daemon.json and restart docker
secure-boot|1|Key was rejected by service;Required key not available;^fact: secure boot is on and the nvidia module comes from DKMS|Secure Boot rejects the unsigned DKMS nvidia module: use the prebuilt signed modules (apt-get purge 'nvidia-dkms-*', then ubuntu-drivers install --gpgpu nvidia:DRIVER-server and reboot), or enrol the DKMS key (mokutil --import /var/lib/shim-signed/mok/MOK.der, reboot, confirm in the MOK manager), or turn Secure Boot off
nouveau|1|^fact: nouveau is loaded|the open-source nouveau driver holds the GPU: echo 'blacklist nouveau' > /etc/modprobe.d/blacklist-nouveau.conf, update-initramfs -u, reboot, then rerun this script
driver-not-loaded|1|NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver;^fact: the nvidia module is not loaded|the nvidia kernel module is not loaded: modprobe nvidia and read dmesg | grep -i nvidia; after a kernel upgrade install its modules: apt-get install linux-modules-nvidia-DRIVER-server-$(uname -r)
apt-source|1|^E: The repository ';^E: Failed to fetch ;^W: GPG error: |apt-get update fails on {source}: fix or disable that source (mv it to a name ending in .disabled), then rerun
gpu-count|1|^fact: the GPU container sees|a GPU is missing from the container: check nvidia-smi on the host and dmesg for Xid errors; a GPU that fell off the bus needs a reboot or a new VM
TABLE
)

DRY_RUN=0
MAY_REBOOT=0
NO_REBOOT=0
CHANGES=0
REBOOT_REASON=""
RESUMED=0
SUMMARY=()
WORK=$(mktemp -d)
CAPTURE=$WORK/output
trap 'rm -rf "$WORK"' EXIT

say() { printf 'torchrig bootstrap: %s\n' "$*"; }

usage_error() {
    say "$1"
    say "usage: sudo bash env/cloud/bootstrap.sh [--dry-run] [--yes] [--no-reboot]"
    exit 2
}

for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        --yes) MAY_REBOOT=1 ;;
        --no-reboot) NO_REBOOT=1 ;;
        -h | --help) sed -n '2,24p' "$SCRIPT" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) usage_error "unknown option '$arg'" ;;
    esac
done

# The source file under /etc/apt that names the URL of a failing apt-get update line.
apt_source_of() {
    local url file
    url=$(grep -Eo "https?://[^ ']+" <<<"$1" | head -n1 | sed -E 's#/dists/.*##; s#/+$##') || true
    [[ -n $url ]] || { echo "(no URL in apt's message)"; return; }
    file=$(grep -rlsF -- "$url" "$APT_SOURCES/sources.list" "$APT_SOURCES/sources.list.d" | head -n1 || true)
    echo "${file:-$url (in no file under $APT_SOURCES)}"
}

# diagnose OUTPUT: walk FAILURE_MODES, print the first match's fix and return its exit code (1 if none).
diagnose() {
    local evidence=$1 name code patterns fix pattern matched
    while IFS='|' read -r name code patterns fix; do
        IFS=';' read -ra alternatives <<<"$patterns"
        for pattern in "${alternatives[@]}"; do
            matched=$(grep -E -m1 -- "$pattern" <<<"$evidence") || continue
            fix=${fix//DRIVER/$DRIVER_BRANCH}
            if [[ $fix == *"{source}"* ]]; then fix=${fix//\{source\}/$(apt_source_of "$matched")}; fi
            say "FAILED ($name): $fix"
            return "$code"
        done
    done <<<"$FAILURE_MODES"
    say "FAILED: see the output above and $LOG_FILE"
    return 1
}

# fail_with EVIDENCE: diagnose and exit; a mode that a reboot cures goes through the reboot path.
# FACTS names a probe whose fact lines join the evidence (the driver step sets it).
FACTS=""
fail_with() {
    local code=0 evidence=$1
    [[ -n $FACTS ]] && evidence+=$'\n'$("$FACTS")
    diagnose "$evidence" || code=$?
    if [[ $code == 3 && $RESUMED == 0 ]]; then
        REBOOT_REASON="the driver needs a reboot"
        reboot_if_needed
    fi
    (( code == 3 && RESUMED )) && code=1  # still broken after the reboot it asked for: do not loop
    summary
    exit "$code"
}

# act KIND DESCRIPTION COMMAND...: the one place anything is changed or run for verification.
# KIND is "change" (system state) or "verify" (builds and runs containers, changes no configuration).
# --dry-run prints and skips; a failure is diagnosed from the command's output and ends the run.
act() {
    local kind=$1 description=$2 rc
    shift 2
    if (( DRY_RUN )); then
        say "would $kind: $description ($*)"
        [[ $kind == change ]] && CHANGES=$((CHANGES + 1))
        return 0
    fi
    say "$kind: $description"
    [[ $kind == change ]] && CHANGES=$((CHANGES + 1))
    set +e
    "$@" 2>&1 | tee "$CAPTURE"
    rc=${PIPESTATUS[0]}
    set -e
    if (( rc != 0 )); then
        say "$description: exit $rc"
        fail_with "$(cat "$CAPTURE")"
    fi
}

# Helpers that act() runs (each is one change).
write_file() { mkdir -p "$(dirname "$1")" && printf '%s\n' "$2" > "$1"; }
fetch_key() { mkdir -p "$(dirname "$2")" && curl -fsSL "$1" -o "$2" && chmod a+r "$2"; }
apt_install() { apt-get install -y "$@"; }
remove_files() { rm -f "$@"; }

installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
installed_matching() {  # installed package names matching an extended regex
    dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\n' 2>/dev/null | awk -F'\t' '$2 ~ /^ii/ {print $1}' \
        | grep -E -- "$1" || true
}

# hold PACKAGE...: apt-mark hold the ones not yet held.
hold() {
    local held missing=()
    held=$(apt-mark showhold 2>/dev/null || true)
    local package
    for package in "$@"; do
        grep -qxF -- "$package" <<<"$held" || missing+=("$package")
    done
    if (( ${#missing[@]} )); then
        act change "hold ${missing[*]} (no unattended upgrade under a running rig)" apt-mark hold "${missing[@]}"
    fi
}

APT_UPDATED=0
apt_update() {
    (( APT_UPDATED )) && return 0
    act change "refresh the package lists" apt-get update
    APT_UPDATED=1
}

boot_id() { cat "$BOOT_ID_FILE" 2>/dev/null || echo unknown; }

# ---- reboot and resume --------------------------------------------------------------------------------
resume_unit() {
    cat <<UNIT
[Unit]
Description=torchrig bootstrap: resume after the reboot it asked for
Wants=network-online.target
After=network-online.target docker.service

[Service]
Type=oneshot
ExecStart=/bin/bash $SCRIPT --yes

[Install]
WantedBy=multi-user.target
UNIT
}

reboot_if_needed() {
    [[ -n $REBOOT_REASON ]] || return 0
    if (( RESUMED )); then
        summary
        say "FAILED: $REBOOT_REASON again after the reboot it needed: read $LOG_FILE and dmesg | grep -i nvidia"
        exit 1
    fi
    if [[ $(cat "$STATE_DIR/reboot-pending" 2>/dev/null) != "$(boot_id) $REBOOT_REASON" ]]; then
        act change "record the pending reboot ($REBOOT_REASON)" \
            write_file "$STATE_DIR/reboot-pending" "$(boot_id) $REBOOT_REASON"
    fi
    if (( MAY_REBOOT && ! NO_REBOOT )); then
        act change "install the per-boot resume hook $RESUME_UNIT_NAME" write_file "$RESUME_UNIT" "$(resume_unit)"
        act change "enable $RESUME_UNIT_NAME" systemctl enable "$RESUME_UNIT_NAME"
        summary
        act change "reboot ($REBOOT_REASON); the bootstrap resumes after the boot" reboot
        (( DRY_RUN )) && return 0
        exit 3
    fi
    (( DRY_RUN )) && return 0
    summary
    say "REBOOT REQUIRED: $REBOOT_REASON. Reboot and rerun, or rerun with --yes to reboot and resume automatically"
    exit 3
}

# A run after the reboot that a previous run asked for: clear the state and the hook.
resume_if_rebooted() {
    [[ -f $STATE_DIR/reboot-pending ]] || return 0
    local recorded reason
    read -r recorded reason < "$STATE_DIR/reboot-pending"
    if [[ $recorded == "$(boot_id)" ]]; then
        say "a reboot is still pending from an earlier run ($reason)"
        REBOOT_REASON=$reason
        return 0
    fi
    RESUMED=1
    say "resuming after the reboot for: $reason"
    act change "clear the pending reboot" remove_files "$STATE_DIR/reboot-pending"
    if [[ -f $RESUME_UNIT ]]; then
        act change "disable $RESUME_UNIT_NAME" systemctl disable "$RESUME_UNIT_NAME"
        act change "remove $RESUME_UNIT" remove_files "$RESUME_UNIT"
    fi
}

summary() {
    say "summary:"
    for line in "${SUMMARY[@]}"; do say "  $line"; done
    if (( DRY_RUN )); then
        say "  dry run: $CHANGES change(s) would be made, none was"
    elif (( CHANGES == 0 )); then
        say "  nothing changed"
    else
        say "  $CHANGES change(s) made; log: $LOG_FILE"
    fi
}

# ---- step 0: preflight --------------------------------------------------------------------------------
PREFLIGHT_CODE=0
preflight_problem() {  # CODE [MESSAGE]: fatal now, or noted and carried to the end under --dry-run
    [[ -z ${2:-} ]] || say "$2"
    if (( DRY_RUN )); then
        (( PREFLIGHT_CODE )) || PREFLIGHT_CODE=$1
        return 0
    fi
    exit "$1"
}

check_arch() {
    ARCH=$(uname -m)
    case $ARCH in
        x86_64 | amd64) ;;
        aarch64 | arm64) say "arm64 is not supported yet: use an x86-64 GPU VM"; exit 4 ;;
        *) say "architecture $ARCH is not supported: use an x86-64 GPU VM"; exit 4 ;;
    esac
}

preflight() {
    local id version codename code=0
    if [[ -r $OS_RELEASE ]]; then
        # shellcheck source=/dev/null
        IFS='|' read -r id version codename < <(. "$OS_RELEASE" && echo "${ID:-}|${VERSION_ID:-}|${VERSION_CODENAME:-}")
    fi
    CODENAME=${codename:-}
    RELEASE=${version:-}
    if [[ ${id:-} != ubuntu || " $SUPPORTED_RELEASES " != *" ${version:-} "* ]]; then
        preflight_problem 4 "unsupported release ${id:-unknown} ${version:-}: use Ubuntu ${SUPPORTED_RELEASES// / or }"
    fi
    # NVIDIA's display (0300) and 3D (0302) controllers; not their audio functions or NVSwitch bridges.
    GPU_COUNT=$( (lspci -n -d 10de: 2>/dev/null || true) | awk '$2 ~ /^030[02]/' | wc -l)
    if ! command -v lspci >/dev/null; then
        preflight_problem 1 "lspci is missing: apt-get install pciutils, then rerun"
    elif (( GPU_COUNT == 0 )); then
        preflight_problem 1 "no NVIDIA GPU in lspci: this VM needs a GPU instance type"
    fi
    # Refused before anything changes: the NVIDIA runtime cannot be configured in snap's confinement.
    if command -v snap >/dev/null && snap list docker >/dev/null 2>&1; then
        diagnose "fact: docker is the snap package" || code=$?
        preflight_problem "$code"
    fi
    # The driver minimum and the verify image come from the CUDA profile table (CUDA= picks one).
    local chosen
    chosen=$(cd "$REPO" && python3 -c '
import sys
from env.rig.profiles import DEFAULT_CUDA, UnknownProfile, profile
try:
    p = profile(sys.argv[1] or DEFAULT_CUDA)
except UnknownProfile as exc:
    sys.exit(f"torchrig bootstrap: {exc}")
print(p.cuda, p.min_driver, p.base_image)' "${CUDA:-}") || exit 2
    read -r CUDA_PROFILE MIN_DRIVER VERIFY_IMAGE <<<"$chosen"
    VERIFY_IMAGE=${TORCHRIG_BOOTSTRAP_VERIFY_IMAGE:-$VERIFY_IMAGE}
    if (( DRIVER_BRANCH < MIN_DRIVER )); then
        say "the pinned driver branch $DRIVER_BRANCH is older than CUDA $CUDA_PROFILE's minimum $MIN_DRIVER: raise DRIVER_BRANCH"
        exit 1
    fi
    say "preflight: ${id:-?} ${version:-?} $ARCH, $GPU_COUNT NVIDIA GPU(s), CUDA $CUDA_PROFILE profile (driver >= $MIN_DRIVER)"
}

# ---- step 1: driver -----------------------------------------------------------------------------------
driver_facts() {
    grep -q '^nouveau ' "$PROC_MODULES" 2>/dev/null && echo "fact: nouveau is loaded"
    if mokutil --sb-state 2>/dev/null | grep -q 'SecureBoot enabled' \
        && [[ -n $(installed_matching '^nvidia-dkms-') && -z $(installed_matching '^linux-modules-nvidia-') ]]; then
        echo "fact: secure boot is on and the nvidia module comes from DKMS"
    fi
    grep -q '^nvidia ' "$PROC_MODULES" 2>/dev/null || echo "fact: the nvidia module is not loaded"
}

install_driver() {
    [[ -n $(installed_version ubuntu-drivers-common) ]] || { apt_update; act change "install ubuntu-drivers" apt_install ubuntu-drivers-common; }
    apt_update
    act change "install the NVIDIA $DRIVER_BRANCH-server driver (prebuilt signed modules)" \
        ubuntu-drivers install --gpgpu "nvidia:$DRIVER_BRANCH-server"
    act change "install nvidia-smi (nvidia-utils-$DRIVER_BRANCH-server)" apt_install "nvidia-utils-$DRIVER_BRANCH-server"
    hold_driver
    REBOOT_REASON="the NVIDIA $DRIVER_BRANCH-server driver was installed"
}

hold_driver() {
    local packages
    mapfile -t packages < <(installed_matching '^(nvidia-(driver|headless|utils|compute-utils|kernel|dkms)|libnvidia-(compute|cfg|decode|encode|extra|fbc|gl|common)|linux-(modules|objects|signatures)-nvidia)-')
    if (( ${#packages[@]} )); then hold "${packages[@]}"; fi
}

step_driver() {
    local output rc=0 version
    output=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1) || rc=$?
    if (( rc == 0 )); then
        version=$(head -n1 <<<"$output")
        if (( ${version%%.*} >= MIN_DRIVER )); then
            say "driver: $version >= $MIN_DRIVER (CUDA $CUDA_PROFILE): unchanged"
            hold_driver
            SUMMARY+=("driver $version")
            return
        fi
        say "driver: $version is older than CUDA $CUDA_PROFILE's minimum $MIN_DRIVER"
        install_driver
        SUMMARY+=("driver $DRIVER_BRANCH-server installed over $version (reboot)")
        return
    fi
    if [[ -n $REBOOT_REASON ]]; then  # installed by an earlier run, not rebooted yet
        say "driver: installed, waiting for the reboot"
        SUMMARY+=("driver installed, reboot pending")
        return
    fi
    if grep -q 'version mismatch' <<<"$output"; then
        say "driver: $output"
        hold_driver
        fail_with "$output"
    fi
    if [[ -z $(installed_matching '^(nvidia-driver-|nvidia-headless-|linux-modules-nvidia-|nvidia-dkms-)') ]]; then
        say "driver: none installed"
        install_driver
        SUMMARY+=("driver $DRIVER_BRANCH-server installed (reboot)")
        return
    fi
    # Installed and rebooted, yet not answering: one try at loading it, then the diagnosis.
    FACTS=driver_facts
    act change "load the nvidia kernel module" modprobe nvidia
    output=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1) || fail_with "$output"
    FACTS=""
    say "driver: $(head -n1 <<<"$output") after loading the module"
    SUMMARY+=("driver $(head -n1 <<<"$output") (module loaded)")
}

# ---- step 2: Docker Engine + compose ------------------------------------------------------------------
docker_apt_version() { echo "5:$DOCKER_VERSION-1~ubuntu.$RELEASE~$CODENAME"; }

add_docker_repo() {
    [[ -s $DOCKER_KEY ]] || act change "fetch Docker's apt key to $DOCKER_KEY" fetch_key "$DOCKER_APT_URL/gpg" "$DOCKER_KEY"
    local line="deb [arch=amd64 signed-by=${DOCKER_KEY#"$ROOT"}] $DOCKER_APT_URL $CODENAME stable"
    if [[ $(cat "$DOCKER_LIST" 2>/dev/null) != "$line" ]]; then
        act change "add Docker's apt repository ($DOCKER_LIST)" write_file "$DOCKER_LIST" "$line"
        APT_UPDATED=0
    fi
}

step_docker() {
    local engine=0 compose=0
    if command -v docker >/dev/null; then
        docker info >/dev/null 2>&1 && engine=1
        docker compose version >/dev/null 2>&1 && compose=1
    fi
    if (( engine && compose )); then
        say "docker: the engine and docker compose answer: unchanged"
        SUMMARY+=("docker $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')")
        return
    fi
    if (( !engine )) && [[ -n $(installed_version docker-ce) ]]; then
        act change "start the Docker engine" systemctl enable --now docker
        docker info >/dev/null 2>&1 && engine=1
        if (( engine && compose )); then
            SUMMARY+=("docker started")
            return
        fi
    fi
    add_docker_repo
    apt_update
    if (( engine )); then
        act change "install the compose plugin" apt_install docker-compose-plugin
        SUMMARY+=("docker compose plugin installed")
        return
    fi
    act change "install Docker Engine $DOCKER_VERSION with the compose plugin" apt_install \
        "docker-ce=$(docker_apt_version)" "docker-ce-cli=$(docker_apt_version)" containerd.io \
        docker-buildx-plugin docker-compose-plugin
    hold docker-ce docker-ce-cli
    SUMMARY+=("docker $DOCKER_VERSION installed")
}

# ---- step 3: NVIDIA Container Toolkit -----------------------------------------------------------------
add_nvidia_repo() {
    [[ -s $NVIDIA_KEY ]] || act change "fetch NVIDIA's apt key to $NVIDIA_KEY" fetch_key "$NVIDIA_APT_URL/gpgkey" "$NVIDIA_KEY"
    # The line NVIDIA's nvidia-container-toolkit.list holds, with our keyring; apt expands $(ARCH).
    # shellcheck disable=SC2016
    local line='deb [signed-by='"${NVIDIA_KEY#"$ROOT"}"'] '"$NVIDIA_APT_URL"'/stable/deb/$(ARCH) /'
    if [[ $(cat "$NVIDIA_LIST" 2>/dev/null) != "$line" ]]; then
        act change "add NVIDIA's container toolkit apt repository ($NVIDIA_LIST)" write_file "$NVIDIA_LIST" "$line"
        APT_UPDATED=0
    fi
}

engine_has_nvidia_runtime() { docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"nvidia"'; }

step_toolkit() {
    local version packages=(nvidia-container-toolkit nvidia-container-toolkit-base libnvidia-container-tools libnvidia-container1)
    version=$(installed_version nvidia-container-toolkit)
    if [[ -z $version ]]; then
        say "toolkit: missing"
        add_nvidia_repo
        apt_update
        act change "install the NVIDIA Container Toolkit $NVIDIA_CTK_VERSION" apt_install "${packages[@]/%/=$NVIDIA_CTK_VERSION}"
        hold "${packages[@]}"
        version=$NVIDIA_CTK_VERSION
    elif [[ $version != "$NVIDIA_CTK_VERSION" ]]; then
        say "toolkit: $version installed (the pin is $NVIDIA_CTK_VERSION): left as it is"
    else
        say "toolkit: $version: unchanged"
        hold "${packages[@]}"
    fi
    if engine_has_nvidia_runtime; then
        say "toolkit: the engine lists the nvidia runtime: unchanged"
    else
        act change "configure the engine's nvidia runtime" nvidia-ctk runtime configure --runtime=docker
        act change "restart the Docker engine" systemctl restart docker
    fi
    SUMMARY+=("NVIDIA Container Toolkit $version")
}

# ---- step 4: verify -------------------------------------------------------------------------------------
step_verify() {
    if ! command -v make >/dev/null; then  # Ubuntu's cloud images have no make, the rig's interface
        apt_update
        act change "install make" apt_install make
    fi
    act verify "a GPU container lists every GPU" docker run --rm --gpus all "$VERIFY_IMAGE" nvidia-smi -L
    if (( !DRY_RUN )); then
        local seen
        seen=$(grep -c '^GPU [0-9]' "$CAPTURE" || true)
        if (( seen != GPU_COUNT )); then
            fail_with "fact: the GPU container sees $seen of the $GPU_COUNT GPUs in lspci"
        fi
        SUMMARY+=("a GPU container sees all $seen GPU(s)")
    fi
    local cuda_arg=()
    [[ -n ${CUDA:-} ]] && cuda_arg=("CUDA=$CUDA")
    act verify "make build" make -C "$REPO" build "${cuda_arg[@]}"
    act verify "make doctor" make -C "$REPO" doctor
    act verify "make nccl-test" make -C "$REPO" nccl-test
    (( DRY_RUN )) || SUMMARY+=("make build, make doctor and make nccl-test passed")
}

# ---- main -------------------------------------------------------------------------------------------------
main() {
    check_arch
    if (( ! DRY_RUN )); then
        if [[ $(id -u) != 0 ]]; then
            say "must run as root: sudo bash env/cloud/bootstrap.sh $*"
            exit 1
        fi
        mkdir -p "$(dirname "$LOG_FILE")" "$STATE_DIR"
        exec > >(tee -a "$LOG_FILE") 2>&1
        exec 9> "$STATE_DIR/lock"
        if ! flock -n 9; then
            say "another bootstrap is running (lock $STATE_DIR/lock): wait for it, or read $LOG_FILE"
            exit 1
        fi
        say "started $(date -u +%Y-%m-%dT%H:%M:%SZ) with: ${*:-no options}"
    else
        say "dry run: nothing will be changed"
    fi
    preflight
    resume_if_rebooted
    for step in driver docker toolkit verify; do
        [[ " $ONLY_STEPS " == *" $step "* ]] || continue
        [[ $step == verify ]] && reboot_if_needed
        say "== $step"
        "step_$step"
    done
    summary
    if (( PREFLIGHT_CODE )); then exit "$PREFLIGHT_CODE"; fi
    (( DRY_RUN )) || say "ready"
}

main "$@"
