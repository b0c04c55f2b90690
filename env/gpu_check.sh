#!/usr/bin/env bash
# Every check that needs a real GPU, in one run on a machine with one GPU: the CUDA-marked tests and
# the model tests, a short bf16 train of `small` with its MFU, the doctor on real NVML, the collective
# test on one rank and its launch overhead, the harness, step-profile, MoE and data-loader benchmarks, a one-GPU
# ResNet-50 bench against the published 4090 claim, the memory plan against the GPU's peak, and decoding speed
# (latent KV cache, MTP speculation).
#
#   bash env/gpu_check.sh            logs and JSON into ${OUT:-runs/gpu-check}, a summary table at the end
#
# It runs with the machine's own python3 and torch (no venv, no network): our pins do not apply.
# Every step has a time limit, and the whole run a budget (BUDGET_S, default 480 s); a step that
# fails or times out does not stop the others. Without a GPU it says so and exits 0, unless FORCE=1.
# TRAIN_CONFIG (default small) is the config of the train, harness and data-loader steps; PYTHON
# (default python3) the interpreter.
# Exit: 0 when every step that ran passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT="${OUT:-runs/gpu-check}"
BUDGET_S="${BUDGET_S:-480}"
TRAIN_CONFIG="${TRAIN_CONFIG:-small}"
PY="${PYTHON:-python3}" # PYTHON: another interpreter, e.g. a venv's, for a dry run
export PYTHONUNBUFFERED=1

names=()
statuses=()
seconds=()
notes=()
started_all=$SECONDS

# record NAME STATUS SECONDS NOTE: one row of the summary table.
record() {
    names+=("$1")
    statuses+=("$2")
    seconds+=("$3")
    notes+=("$4")
}

# note TEXT: add figures read from its output to the last step's note, unless that step was skipped.
note() {
    local last=$((${#notes[@]} - 1))
    [[ "${statuses[$last]}" == SKIP || -z "$1" ]] && return
    notes[last]="${notes[$last]:+${notes[$last]}; }$1"
}

# missing_modules MODULE...: the ones python3 cannot import, space-separated.
missing_modules() {
    local module missing=()
    for module in "$@"; do
        "$PY" -c "import $module" >/dev/null 2>&1 || missing+=("$module")
    done
    echo "${missing[*]}"
}

# run_step NAME LIMIT_S NEEDS COMMAND...: run COMMAND under a time limit, log to $OUT/NAME.log.
# NEEDS: space-separated Python modules without which the step is skipped (empty: none).
run_step() {
    local name="$1" limit="$2" needs="$3"
    shift 3
    local left=$((BUDGET_S - (SECONDS - started_all)))
    if ((left < 15)); then
        record "$name" SKIP 0 "out of time (BUDGET_S=$BUDGET_S)"
        return
    fi
    if [[ -n "$needs" ]]; then
        local missing
        # shellcheck disable=SC2086 # NEEDS is a list of module names
        missing=$(missing_modules $needs)
        if [[ -n "$missing" ]]; then
            record "$name" SKIP 0 "python3 cannot import: $missing"
            return
        fi
    fi
    ((limit > left)) && limit=$left
    local shown="$*"
    shown="${shown//$'\n'/ }"
    echo
    echo "=== $name (limit ${limit}s): ${shown:0:160}"
    local began=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - began))
    case "$rc" in
        0) record "$name" PASS "$took" "" ;;
        124 | 137) record "$name" TIMEOUT "$took" "stopped after ${limit}s; see $OUT/$name.log" ;;
        *) record "$name" FAIL "$took" "exit $rc; see $OUT/$name.log" ;;
    esac
}

# figures KIND FILE: one line of figures from a JSON file a step wrote (KIND: train, bench or doctor).
figures() {
    "$PY" - "$@" <<'PYEOF' 2>/dev/null || echo "no figures: $2 missing or unreadable"
import json
import sys

MFU_TARGET = 0.40
kind, path = sys.argv[1], sys.argv[2]
d = json.load(open(path))


def num(value, spec):
    return "n/a" if value is None else format(value, spec)


def train(d):
    verdict = "n/a" if d["mfu"] is None else "ok" if d["mfu"] >= MFU_TARGET else "BELOW"
    return (
        f"tokens/s {num(d['tokens_per_sec'], ',.0f')}, MFU {num(d['mfu'], '.1%')} (target >= {MFU_TARGET:.0%}: "
        f"{verdict}), {d['precision']}, {num(d['step_ms'], '.1f')} ms/step, peak {num(d['peak_mem_gb'], '.1f')} GB"
    )


def bench(d):
    return (
        f"{d['config']} {d['workload']['precision']}: {num(d['rows'][0]['samples_per_sec'], ',.0f')} samples/s, "
        f"MFU {num(d['rows'][0]['mfu'], '.1%')} on {d['device']} (public 4090 fp16: ~1300 img/s); "
        f"vs 4090 claim: {d['baseline']['overall']}"
    )


def doctor(d):
    failed = [c["name"] for c in d["checks"] if c["status"] == "FAIL"]
    return f"worst {d['worst']}" + (f"; FAIL: {', '.join(failed)}" if failed else "")


print({"train": train, "bench": bench, "doctor": doctor}[kind](d))
PYEOF
}

# last_line FILE PATTERN: the last line of FILE matching PATTERN (a figure a benchmark printed).
last_line() {
    grep -E "$2" "$1" 2>/dev/null | tail -n 1
}

# loader_note LOG: how many source/worker rows of a data-loader log keep up with one rank.
loader_note() {
    local rows
    rows=$(grep -cE ' (ok|below [0-9]+×)$' "$1")
    echo "$(grep -cE ' ok$' "$1") of $rows source/worker rows feed >= 10x one rank's consumption"
}

if [[ "${FORCE:-0}" != 1 ]] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: needs a CUDA GPU visible to python3's torch, and none is; nothing to do (FORCE=1 runs it anyway)"
    exit 0
fi

mkdir -p "$OUT"
echo "gpu_check: logs in $OUT, budget ${BUDGET_S}s, train config $TRAIN_CONFIG"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

run_step preflight 60 "" "$PY" -c '
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported())
for name in ("yaml", "numpy", "pytest", "torchvision", "pynvml", "matplotlib"):
    try:
        version = getattr(importlib.import_module(name), "__version__", "present")
        print(f"{name}: {version}")
    except ImportError:
        print(f"{name}: MISSING")
'
missing=$(grep ': MISSING' "$OUT/preflight.log" 2>/dev/null | cut -d: -f1 | tr '\n' ' ')
note "${missing:+missing: $missing}"

run_step tests-cuda 120 "pytest yaml" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
run_step tests-model 90 "pytest yaml" "$PY" -m pytest -q -p no:cacheprovider \
    tests/train/models/test_deepseek.py tests/train/models/test_resnet.py

run_step "train-$TRAIN_CONFIG" 150 "yaml" "$PY" -m train.launch --gpus 1 --config "$TRAIN_CONFIG" --steps 60 \
    --run-dir "$OUT/train-$TRAIN_CONFIG"
rm -rf "$OUT/train-$TRAIN_CONFIG/checkpoints" # weights of a 60-step check are not worth carrying back
note "$(figures train "$OUT/train-$TRAIN_CONFIG/summary.json")"

run_step bench-resnet50 150 "yaml torchvision" "$PY" -m train.bench --gpus 1 --baseline rtx4090-claim \
    --precision bf16 --steps 40 --run-dir "$OUT/bench-resnet50"
note "$(figures bench "$OUT/bench-resnet50/bench.json")"

run_step harness-overhead 120 "yaml" "$PY" -m train.benchmarks.harness_overhead --config "$TRAIN_CONFIG" --steps 50
note "$(last_line "$OUT/harness-overhead.log" '^overhead')"

run_step doctor 60 "" "$PY" -m env.machine.doctor --json "$OUT/doctor.json"
note "$(figures doctor "$OUT/doctor.json")"

run_step nccl-1rank 60 "" "$PY" -m env.nccl.launch --gpus 1 --json "$OUT/nccl.json"
note "$(last_line "$OUT/nccl-1rank.log" '^VERDICT')"

run_step launch-overhead 45 "" "$PY" -m env.nccl.launch --gpus 1 --launch-overhead
note "$(last_line "$OUT/launch-overhead.log" 'launch overhead' | sed 's/^# //')"

# Where the step's time goes, should the MFU fall short: the device idle share, kernels and host syncs per step.
run_step step-profile 60 "yaml" "$PY" -m train.benchmarks.step_profile --config "$TRAIN_CONFIG" --steps 5
note "$(last_line "$OUT/step-profile.log" '^device busy' | sed 's/ *: */: /')"

# The MoE against a dense model of the same active size, in bf16: one layer (small, V2-Lite sizes), the training step
# of tiny and small with the MFU of this code and of the per-expert loop before it, host syncs per step (CUDA's own
# count) and what the trainer's per-step read of the loss costs.
run_step moe 150 "yaml" "$PY" -m train.benchmarks.moe --tables layer,step,syncs --shapes small,v2-lite --repeats 5
note "$(last_line "$OUT/moe.log" '^summary: ' | sed 's/^summary: //')"

run_step data-loader 75 "yaml" "$PY" -m train.benchmarks.data_loader --config "$TRAIN_CONFIG" --seconds 2
note "$(loader_note "$OUT/data-loader.log")"
# Synthetic images are made on the CPU: does the loader keep up with a fast GPU's ResNet-50 steps?
run_step data-loader-resnet50 60 "yaml torchvision" "$PY" -m train.benchmarks.data_loader --config resnet50 \
    --workers 0,4 --seconds 2
note "$(loader_note "$OUT/data-loader-resnet50.log")"

# The memory plan against this GPU: planned bytes (less its CUDA/NCCL allowance) vs max_memory_allocated, and
# the CUDA context this process measured, per config with and without activation checkpointing.
run_step plan-memory 90 "yaml" "$PY" -m train.benchmarks.plan --device cuda --configs small,llama-124m --batch 4
note "$(last_line "$OUT/plan-memory.log" '^largest error')"

# Decoding: tokens/s without a cache, with MLA's latent cache and with MTP speculation, after a short train.
run_step sample-decode 90 "yaml" "$PY" -m train.benchmarks.sample --config tiny --train-steps 200 --tokens 200
note "$(last_line "$OUT/sample-decode.log" '^speculation speed-up'); $(last_line "$OUT/sample-decode.log" '^latent cache' | tr -s ' ')"

echo
echo "=== gpu_check summary ($((SECONDS - started_all))s of ${BUDGET_S}s budget; logs in $OUT)"
printf '%-22s %-8s %6s  %s\n' step status seconds note
failed=0
for i in "${!names[@]}"; do
    printf '%-22s %-8s %6s  %s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}" "${notes[$i]}"
done | tee "$OUT/summary.txt"
for status in "${statuses[@]}"; do
    [[ "$status" == FAIL || "$status" == TIMEOUT ]] && failed=1
done
exit "$failed"
