"""How a run ends when something goes wrong: one line on the terminal, the right exit code and a
consistent record on disk, never a traceback. Real processes with faults injected (tests/faults.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.jobs import ENV


def _run(fault: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.faults", fault, *args], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=600)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    """The only line on stderr besides progress bars (transformers' "Loading weights")."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


FAILED_JOBS = {  # fault: extra overrides, exit code, the line on stderr, the record's error, a traceback in the log
    "sigint": ((), 130, "interrupted", "interrupted (Ctrl-C)", False),
    "bug": ((), 1, "internal error: RuntimeError: injected bug (traceback in {run_dir}/run.log)",
            "RuntimeError: injected bug", True),
    "disk_full_on_save": (("save_model=true",), 1,
                          "error: cannot write {run_dir}/model/model.safetensors: No space left on device",
                          "OSError: [Errno 28] No space left on device: '{run_dir}/model/model.safetensors'", True),
}


@pytest.mark.parametrize("fault", FAILED_JOBS)
def test_a_failed_job_ends_in_one_line_its_exit_code_and_a_failed_record(fault, tiny_job, tmp_path):
    """Ctrl-C, an unexpected error, a disk that fills while the model is saved: the line and exit code
    of each, a failed record naming the error, and the error's traceback once in the job's log (Ctrl-C:
    none, it is no fault of the code)."""
    overrides, code, line, error, traced = FAILED_JOBS[fault]
    run_dir = tmp_path / "run"
    proc = _run(fault, tiny_job.args(f"hydra.run.dir={run_dir}", *overrides), tmp_path)
    assert proc.returncode == code and _one_line(proc) == line.format(run_dir=run_dir)
    record, error = _record(run_dir), error.format(run_dir=run_dir)
    assert record["status"] == "failed" and record["error"] == error
    log = (run_dir / "run.log").read_text()
    assert log.count("Traceback") == traced and (error.split(": ", 1)[-1] in log) == traced, log[-3000:]


def test_an_unexpected_error_before_the_job_keeps_its_traceback_in_a_file(tiny_job, tmp_path):
    proc = _run("bug_before_job", tiny_job.args(f"hydra.run.dir={tmp_path / 'run'}"), tmp_path)
    line = _one_line(proc)
    assert proc.returncode == 1 and line.startswith("internal error: RuntimeError: injected bug (traceback in ")
    assert "injected bug" in Path(line.rsplit("traceback in ", 1)[1].rstrip(")")).read_text()


def test_a_full_disk_leaves_no_record_and_no_temporary_files(tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    proc = _run("disk_full", tiny_job.args(f"hydra.run.dir={run_dir}"), tmp_path)
    assert proc.returncode == 1
    assert _one_line(proc) == f"error: cannot write {run_dir}/results.json: No space left on device"
    assert not (run_dir / "results.json").exists() and not list(run_dir.glob(".results.json.*"))


def test_a_read_only_run_folder_ends_in_one_line_and_nothing_written(tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _run("read_only", tiny_job.args(f"hydra.run.dir={run_dir}"), tmp_path, env={"READ_ONLY_DIR": str(run_dir)})
    assert proc.returncode == 1
    line = _one_line(proc)
    assert line.startswith(f"error: cannot write {run_dir}/") and line.endswith("Read-only file system"), line
    assert list(run_dir.iterdir()) == []

