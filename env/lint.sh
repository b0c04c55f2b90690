#!/usr/bin/env bash
# make lint: hadolint on the Dockerfile, shellcheck on every shell script, the compose file through each
# compose version installed (v1 docker-compose, v2 docker compose), and ruff check + ruff format --check.
# The tools are hash-locked in env/dev-requirements.txt and installed into .build/dev-venv, apart from the
# project's .venv so that one stays exactly the runtime lock. Every check runs; the exit code says if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

dev_venv=.build/dev-venv
stamp="$dev_venv/.dev-requirements.sha256"
lock_digest=$(sha256sum env/dev-requirements.txt | cut -d' ' -f1)
if [[ ! -x "$dev_venv/bin/ruff" || "$(cat "$stamp" 2>/dev/null)" != "$lock_digest" ]]; then
    echo "lint: installing the lint tools from env/dev-requirements.txt into $dev_venv"
    python3 -m venv "$dev_venv"
    "$dev_venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --require-hashes --only-binary=:all: -r env/dev-requirements.txt
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

check "ruff check" ruff check .
check "ruff format --check" ruff format --check .

if (( ${#failed[@]} )); then
    printf 'lint: FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "lint: all checks passed"
