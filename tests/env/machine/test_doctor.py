"""The doctor: checks on recorded facts (tests/fixtures/doctor/*.json), the report, the JSON, the exit codes."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from env.common.cli import exit_code
from env.machine import checks, doctor
from env.machine import facts as machine
from env.machine.checks import CHECKS, GIB, MIB, CheckResult, Status, run_checks
from env.machine.facts import Facts
from env.machine.nvml import Snapshot
from tests.helpers.paths import FIXTURES, ROOT

GPU_CHECKS = ("gpus", "driver", "arch", "pcie", "p2p")


def load_facts(name: str) -> Facts:
    return Facts.from_dict(json.loads((FIXTURES / "doctor" / name).read_text()))


def status_of(facts: Facts, name: str) -> CheckResult:
    check = dict(CHECKS)[name]
    return check(facts)


@pytest.fixture
def healthy() -> Facts:
    return load_facts("healthy_4090x3.json")


def test_healthy_4090_box_passes_every_check(healthy: Facts) -> None:
    outcomes = run_checks(healthy)
    assert {o.name: o.status for o in outcomes if o.status is not Status.OK} == {}
    assert doctor.exit_code(outcomes) == 0


def test_fixture_facts_round_trip_through_json(healthy: Facts) -> None:
    assert Facts.from_dict(json.loads(json.dumps(healthy.to_dict()))) == healthy


def test_old_driver_with_the_cuda_12_1_image_fails() -> None:
    result = status_of(load_facts("old_driver_525.json"), "driver")
    assert result.status is Status.FAIL
    assert "525.147.05" in result.evidence and "530" in result.fix


@pytest.mark.parametrize(
    ("cuda", "driver", "expected"),
    [
        ("12.1", "530.30.02", Status.OK),
        ("12.4", "545.29.06", Status.FAIL),
        ("12.4", "550.54.14", Status.OK),
        ("12.6", "555.42.06", Status.FAIL),
        ("12.8", "570.86.10", Status.OK),
        ("12.7", "565.57.01", Status.OK),  # no such release: checked against 12.6's minimum
    ],
)
def test_driver_minimum_follows_the_cuda_table(healthy: Facts, cuda: str, driver: str, expected: Status) -> None:
    healthy.torch_cuda = cuda
    healthy.image_labels = {}
    healthy.snapshot.driver_version = driver
    assert status_of(healthy, "driver").status is expected


def test_driver_check_uses_the_image_cuda_when_newer_than_torch(healthy: Facts) -> None:
    healthy.image_labels = {"TORCHRIG_CUDA_PROFILE": "12.8"}
    healthy.snapshot.driver_version = "550.120"
    result = status_of(healthy, "driver")
    assert result.status is Status.FAIL and "12.8 (image)" in result.evidence


def test_forward_compat_is_offered_only_on_datacenter_gpus(healthy: Facts) -> None:
    healthy.snapshot.driver_version = "525.147.05"
    assert "cuda-compat" not in status_of(healthy, "driver").fix
    for gpu in healthy.snapshot.gpus:
        gpu.name = "NVIDIA H100 80GB HBM3"
    assert "cuda-compat-12-1" in status_of(healthy, "driver").fix


def test_gpu_at_pcie_x4_under_load_fails() -> None:
    result = status_of(load_facts("pcie_x4_under_load.json"), "pcie")
    assert result.status is Status.FAIL
    assert "GPU2" in result.evidence and "x4" in result.evidence


def test_pcie_x8_under_load_warns_and_idle_gen_downshift_passes(healthy: Facts) -> None:
    healthy.snapshot.gpus[1].pcie_width_current = 8
    assert status_of(healthy, "pcie").status is Status.WARN
    idle = load_facts("healthy_4090x3.json")
    idle.pcie_load = "not run: not asked"
    for gpu in idle.snapshot.gpus:
        gpu.pcie_gen_current, gpu.utilization_pct = 1, 0
    assert status_of(idle, "pcie").status is Status.OK


def test_pcie_x4_without_load_is_not_judged_a_fault() -> None:
    facts = load_facts("pcie_x4_under_load.json")
    facts.pcie_load = "not run: not asked"
    facts.snapshot.gpus[2].utilization_pct = 0
    assert status_of(facts, "pcie").status is Status.WARN


def test_missing_nvml_warns_on_gpu_checks_without_crashing() -> None:
    facts = load_facts("no_nvml.json")
    outcomes = {o.name: o for o in run_checks(facts)}
    assert all(outcomes[name].status is Status.WARN for name in GPU_CHECKS)
    assert "NVML" in outcomes["gpus"].evidence
    assert "the check itself failed" not in " ".join(o.evidence for o in outcomes.values())
    assert "no GPU here" in doctor.render_report(facts, list(outcomes.values()))


@pytest.mark.parametrize("name", sorted(p.name for p in (FIXTURES / "nvml").glob("*.json")) or ["(none yet)"])
def test_recorded_nvml_snapshots_run_through_every_check(healthy: Facts, name: str) -> None:
    path = FIXTURES / "nvml" / name
    if not path.exists():
        pytest.skip("no recorded NVML snapshots in tests/fixtures/nvml yet")
    healthy.snapshot = Snapshot.load(path)
    healthy.gpus_requested = None
    outcomes = run_checks(healthy)
    assert all(o.evidence and "\n" not in o.evidence for o in outcomes)
    assert "the check itself failed" not in " ".join(o.evidence for o in outcomes)
    gpus = outcomes[0]
    assert gpus.name == "gpus" and gpus.status is not Status.FAIL
    assert sum(int(n) for n in re.findall(r"(\d+)× ", gpus.evidence)) == len(healthy.snapshot.gpus)


def test_trio_catches_a_mismatched_torchvision(healthy: Facts) -> None:
    healthy.dist_versions = {"torch": "2.4.1+cu121", "torchvision": "0.20.1", "torchaudio": "2.4.1"}
    result = status_of(healthy, "trio")
    assert result.status is Status.FAIL
    assert "0.20.1" in result.evidence and "0.19.1" in result.evidence and "torchvision::nms" in result.fix


@pytest.mark.parametrize(
    ("torch", "vision", "audio", "expected"),
    [
        ("2.6.0", "0.21.0", "2.6.0", Status.OK),
        ("2.7.1", "0.22.1", "2.7.1", Status.OK),
        ("2.8.0", "0.23.0", "2.8.0", Status.OK),
        ("2.8.0", "0.23.0", "2.7.1", Status.FAIL),
        ("2.20.1", "0.35.1", None, Status.OK),  # not in the table: the 0.(minor+15) rule holds
        ("2.20.1", "0.30.0", None, Status.WARN),
    ],
)
def test_trio_table_and_rule(healthy: Facts, torch: str, vision: str, audio: str | None, expected: Status) -> None:
    healthy.dist_versions = {"torch": torch, "torchvision": vision, "torchaudio": audio}
    assert status_of(healthy, "trio").status is expected


def test_torch_differing_from_the_lock_fails(healthy: Facts) -> None:
    healthy.dist_versions = {**healthy.dist_versions, "torch": "2.5.1"}
    result = status_of(healthy, "pins")
    assert result.status is Status.FAIL and "2.5.1" in result.evidence and "2.4.1" in result.evidence


def test_nccl_loaded_versus_pinned(healthy: Facts) -> None:
    assert status_of(healthy, "nccl").status is Status.OK
    healthy.nccl_version = "2.21.5"
    assert status_of(healthy, "nccl").status is Status.FAIL
    healthy.torch_cuda, healthy.nccl_version = None, None
    cpu_only = status_of(healthy, "nccl")
    assert cpu_only.status is Status.WARN and "CPU-only" in cpu_only.evidence


@pytest.mark.parametrize(
    ("cc", "arch_list", "expected"),
    [
        ((8, 9), ["sm_80", "sm_86", "sm_90"], Status.OK),  # sm_86 cubins run on sm_89
        ((9, 0), ["sm_80", "sm_86", "sm_90"], Status.OK),
        ((12, 0), ["sm_80", "sm_86", "sm_90", "compute_90"], Status.WARN),  # PTX JIT
        ((12, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], Status.FAIL),
        ((8, 0), ["sm_86", "sm_90"], Status.FAIL),  # a newer minor's cubins do not run on an older GPU
        ((9, 0), ["sm_90a"], Status.FAIL),
    ],
)
def test_arch_check(healthy: Facts, cc: tuple[int, int], arch_list: list[str], expected: Status) -> None:
    for gpu in healthy.snapshot.gpus:
        gpu.compute_capability = cc
    healthy.arch_list = arch_list
    assert status_of(healthy, "arch").status is expected


def test_shm_of_64_mb_fails_with_three_gpus_and_large_shm_passes(healthy: Facts) -> None:
    healthy.shm_bytes = 64 * MIB
    small = status_of(healthy, "shm")
    assert small.status is Status.FAIL and "shm" in small.fix
    for size in (16 * GIB, 64 * GIB):  # shm_size 16g, or ipc=host on a 128 GiB host
        healthy.shm_bytes = size
        assert status_of(healthy, "shm").status is Status.OK


def test_shm_of_64_mb_with_one_gpu_only_warns(healthy: Facts) -> None:
    healthy.shm_bytes, healthy.gpus_requested = 64 * MIB, 1
    assert status_of(healthy, "shm").status is Status.WARN


def test_ipc_mode_hints(healthy: Facts) -> None:
    healthy.shm_bytes = healthy.mem_total_bytes // 2
    assert "ipc=host" in status_of(healthy, "ipc").evidence
    healthy.shm_bytes = 64 * MIB
    assert status_of(healthy, "ipc").status is Status.WARN


def test_default_ulimits_warn(healthy: Facts) -> None:
    healthy.ulimits = {"memlock": [8 * MIB, 8 * MIB], "stack": [8 * MIB, None]}
    result = status_of(healthy, "ulimits")
    assert result.status is Status.WARN and "memlock" in result.evidence and "stack" in result.evidence


def test_docker_without_nvidia_runtime_warns_on_a_gpu_host(healthy: Facts) -> None:
    healthy.in_container = False
    healthy.docker = {"probed": True, "answers": True, "nvidia": False, "reason": "Docker 27.3 answers, without"}
    assert status_of(healthy, "docker-gpu").status is Status.WARN
    healthy.docker["nvidia"] = True
    assert status_of(healthy, "docker-gpu").status is Status.OK
    healthy.docker = {"probed": True, "answers": False, "nvidia": False, "reason": "no Docker client"}
    assert "RUNTIME=local" in status_of(healthy, "docker-gpu").evidence


def test_low_disk_fails(healthy: Facts) -> None:
    healthy.disk_free_bytes = GIB // 2
    assert status_of(healthy, "disk").status is Status.FAIL


def test_p2p_forced_on_by_the_user_over_unsupported_pairs_warns(healthy: Facts) -> None:
    assert "P2P off" in status_of(healthy, "p2p").evidence
    healthy.environ = {"NCCL_P2P_DISABLE": "0"}
    assert status_of(healthy, "p2p").status is Status.WARN


def test_missing_torch_fails_with_make_setup(healthy: Facts) -> None:
    missing = Facts(snapshot=healthy.snapshot, torch_error="ModuleNotFoundError: No module named 'torch'")
    outcomes = {o.name: o for o in run_checks(missing)}
    assert outcomes["torch"].status is Status.FAIL and outcomes["torch"].fix == "make setup"
    assert "the check itself failed" not in " ".join(o.evidence for o in outcomes.values())


def test_a_check_that_raises_is_reported_not_fatal(healthy: Facts) -> None:
    def broken(_: Facts) -> CheckResult:
        raise KeyError("oops")

    outcomes = run_checks(healthy, [("broken", broken), *CHECKS[:1]])
    assert outcomes[0].status is Status.WARN and "KeyError" in outcomes[0].evidence
    assert len(outcomes) == 2


def test_check_names_are_unique() -> None:
    names = [name for name, _ in CHECKS]
    assert len(names) == len(set(names))


def _main_with(facts: Facts, tmp_path: Path) -> tuple[int, dict]:
    out = tmp_path / "doctor.json"
    code = doctor.main(["--json", str(out)], facts=facts)
    return code, json.loads(out.read_text())


def test_json_schema_is_stable(healthy: Facts, tmp_path: Path) -> None:
    _, report = _main_with(healthy, tmp_path)
    assert set(report) == {"schema", "worst", "checks", "facts"}
    assert report["schema"] == 1
    assert [c["name"] for c in report["checks"]] == [name for name, _ in CHECKS]
    assert all(set(c) == {"name", "status", "evidence", "fix"} for c in report["checks"])
    assert set(report["facts"]) == {f.name for f in dataclasses.fields(Facts)}


@pytest.mark.parametrize(
    ("fixture", "code", "worst"),
    [("healthy_4090x3.json", 0, "OK"), ("no_nvml.json", 0, "WARN"), ("old_driver_525.json", 1, "FAIL")],
)
def test_exit_code_follows_the_worst_check(tmp_path: Path, fixture: str, code: int, worst: str, capsys) -> None:
    got, report = _main_with(load_facts(fixture), tmp_path)
    assert (got, report["worst"]) == (code, worst)
    assert f"result: {worst} (exit {code})" in capsys.readouterr().out


def test_report_puts_the_fix_under_each_failing_row(capsys) -> None:
    doctor.main([], facts=load_facts("old_driver_525.json"))
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("FAIL") and " driver " in line)
    assert lines[row + 1].strip().startswith("fix: upgrade the NVIDIA driver")


def test_image_labels_come_from_the_dockerfile_variables(monkeypatch) -> None:
    monkeypatch.setenv("TORCHRIG_CUDA_PROFILE", "12.4")
    monkeypatch.setenv("TORCHRIG_VERSION", "1.2.3")
    monkeypatch.setenv("TORCHRIG_UNRELATED", "x")
    labels = machine.image_labels()
    assert labels["TORCHRIG_CUDA_PROFILE"] == "12.4" and labels["TORCHRIG_VERSION"] == "1.2.3"
    assert "TORCHRIG_UNRELATED" not in labels


def test_gathering_without_gpu_load_never_runs_the_load(monkeypatch, tmp_path: Path) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("the GPU load ran")

    monkeypatch.setattr(machine, "read_snapshot_under_load", refuse)
    facts = machine.gather_facts(tmp_path, gpu_load=False, probe_docker=False)
    assert facts.pcie_load.startswith("not run") and facts.run_dir == str(tmp_path)
    assert facts.disk_free_bytes and facts.cpu_count >= 1


def test_real_doctor_run_is_coherent_with_its_json(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TORCHRIG_LOCK"}
    done = subprocess.run(
        [sys.executable, "-m", "env.machine.doctor", "--json", str(out), "--run-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert "Traceback" not in done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert done.returncode == (1 if report["worst"] == "FAIL" else 0)
    assert report["worst"] == checks.worst([Status(c["status"]) for c in report["checks"]]).value
    assert f"result: {report['worst']}" in done.stdout


def test_doctor_without_torch_reports_fail_and_no_traceback(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    block_torch = "import sys; sys.modules['torch'] = None; from env.machine.doctor import main; "
    code = f"{block_torch}sys.exit(main(['--no-load', '--json', {str(out)!r}, '--run-dir', {str(tmp_path)!r}]))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert "Traceback" not in done.stdout + done.stderr
    assert done.returncode == 1
    torch_check = next(c for c in json.loads(out.read_text())["checks"] if c["name"] == "torch")
    assert (torch_check["status"], torch_check["fix"]) == ("FAIL", "make setup")


def test_unwritable_json_path_is_one_line_and_exit_2(healthy: Facts, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert (
        exit_code(
            "doctor", lambda argv: doctor.main(argv, facts=copy.deepcopy(healthy)), ["--json", str(blocker / "x.json")]
        )
        == 2
    )
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.cuda
def test_pcie_is_read_while_the_gpus_are_busy() -> None:
    snapshot, load = machine.read_snapshot_under_load(seconds=1.5)
    assert load == "ran", load
    busy = [g.utilization_pct for g in snapshot.gpus if g.utilization_pct is not None]
    assert busy and max(busy) >= checks.BUSY_PCT
