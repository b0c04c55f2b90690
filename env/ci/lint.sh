#!/usr/bin/env bash
# make lint: hadolint on the Dockerfile, shellcheck on every shell script, the compose file through each
# compose version installed (v1 docker-compose, v2 docker compose), the cloud-init user-data and the
# SkyPilot task (env/cloud/), and ruff check + ruff format --check.
# The tools are hash-locked in env/ci/dev-requirements.txt and installed into .build/dev-venv, apart from the
# project's .venv so that one stays exactly the runtime lock. Every check runs; the exit code says if any failed.
set -euo pipefail
cd "$(dirname "$0")/../.."

dev_venv=.build/dev-venv
stamp="$dev_venv/.dev-requirements.sha256"
lock_digest=$(sha256sum env/ci/dev-requirements.txt | cut -d' ' -f1)
if [[ ! -x "$dev_venv/bin/ruff" || "$(cat "$stamp" 2>/dev/null)" != "$lock_digest" ]]; then
    echo "lint: installing the lint tools from env/ci/dev-requirements.txt into $dev_venv"
    python3 -m venv "$dev_venv"
    "$dev_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --require-hashes --only-binary=:all: -r env/ci/dev-requirements.txt
    echo "$lock_digest" > "$stamp"
fi
export PATH="$PWD/$dev_venv/bin:$PATH"

failed=()
# check NAME COMMAND...: run one check, remember it when it fails.
check() {
    local name="$1"
    shift
    echo "lint: $name"
    if ! "$@"; then
        failed+=("$name")
    fi
}

shell_scripts() {
    git ls-files --cached --others --exclude-standard -- '*.sh'
    [[ -f .ci/run ]] && echo .ci/run
}

check "hadolint Dockerfile" hadolint Dockerfile
mapfile -t scripts < <(shell_scripts | sort -u)
check "shellcheck ${scripts[*]}" shellcheck "${scripts[@]}"

# compose validates the file without an engine; each version installed here gets a say.
compose_checked=0
if command -v docker-compose >/dev/null; then
    check "docker-compose config (v1: $(docker-compose version --short))" docker-compose config -q
    compose_checked=1
fi
docker_client="${DOCKER:-docker}"
if command -v "$docker_client" >/dev/null && "$docker_client" compose version >/dev/null 2>&1; then
    check "$docker_client compose config (v2)" "$docker_client" compose config -q
    compose_checked=1
fi
if [[ $compose_checked == 0 ]]; then
    echo "lint: docker-compose.yml not validated: neither docker-compose nor docker compose is installed"
fi

# The cloud files (shellcheck above already covers env/cloud/*.sh): the user-data through cloud-init's own
# schema (Debian's cloud-init package), the SkyPilot task through SkyPilot's own parser, for 1 node and for
# N nodes. SkyPilot lives in a throwaway venv of its own, kept between runs; its import writes under HOME,
# so HOME is a temporary directory.
cloud_init_schema() {
    if ! command -v cloud-init >/dev/null; then
        echo "lint: installing Debian's cloud-init for cloud-init schema"
        if [[ $(id -u) != 0 ]] || ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            cloud-init >/dev/null || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends cloud-init >/dev/null; }; }; then
            echo "lint: cloud-init is not installed and could not be: sudo apt-get install cloud-init"
            return 1
        fi
    fi
    cloud-init schema -c env/cloud/user-data.yaml
}
check "cloud-init schema env/cloud/user-data.yaml" cloud_init_schema

skypilot_spec="skypilot==0.14.1"
skypilot_venv=.build/skypilot-venv
skypilot_task() {
    if [[ ! -x $skypilot_venv/bin/python || "$(cat "$skypilot_venv/.spec" 2>/dev/null)" != "$skypilot_spec" ]]; then
        echo "lint: installing $skypilot_spec into $skypilot_venv (once)"
        rm -rf "$skypilot_venv"
        python3 -m venv "$skypilot_venv"
        "$skypilot_venv/bin/python" -m pip install --quiet --disable-pip-version-check "$skypilot_spec" || return 1
        echo "$skypilot_spec" > "$skypilot_venv/.spec"
    fi
    local home rc=0
    home=$(mktemp -d)
    HOME=$home "$skypilot_venv/bin/python" - env/cloud/skypilot.yaml <<'PY' || rc=$?
import sys

import sky
import yaml

path = sys.argv[1]
sky.Task.from_yaml(path)
config = yaml.safe_load(open(path))
for nodes in (1, 2, 8):
    task = sky.Task.from_yaml_config({**config, "num_nodes": nodes})
    accelerators = [resources.accelerators for resources in task.resources]
    assert task.num_nodes == nodes and accelerators == [{"RTX4090": 3}], (task.num_nodes, accelerators)
print(f"{path}: a valid SkyPilot task, {accelerators[0]} per node, for 1, 2 and 8 nodes")
PY
    rm -rf "$home"
    return "$rc"
}
check "SkyPilot Task.from_yaml env/cloud/skypilot.yaml" skypilot_task

check "ruff check" ruff check .
check "ruff format --check" ruff format --check .

if (( ${#failed[@]} )); then
    printf 'lint: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "lint: all checks passed"
