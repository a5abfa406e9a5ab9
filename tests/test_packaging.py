"""A wheel built from the repository installs into a fresh venv, and its `stat-exp` runs a job there,
configs included (nothing read from the source tree)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

from tests.jobs import ENV, REPO, run_cli


def test_wheel_installed_in_a_fresh_venv_runs_the_cli(tiny_job, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "stat_exp", src / "stat_exp", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("stat_exp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"stat_exp/conf/config.yaml", "stat_exp/conf/hydra/launcher/joblib.yaml",
            "stat_exp/eval/tasks/stat_wiki_ppl.yaml"} <= set(names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co., not stat_exp
    # --ignore-installed: the venv sees this interpreter's packages (an editable stat-exp among them)
    # and must get its own copy without touching that one.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--ignore-installed", str(wheel)], check=True, capture_output=True)

    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import stat_exp; print(stat_exp.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_job.args(f"hydra.run.dir={run_dir}"), tmp_path, executable=str(venv / "bin" / "stat-exp"),
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"
    assert os.path.exists(run_dir / ".hydra" / "config.yaml")
    assert "tiny pruned by magnitude_sp" in proc.stdout and f"results:  {run_dir}" in proc.stdout  # what it did
    help_page = run_cli(["--help"], tmp_path, executable=str(venv / "bin" / "stat-exp"), env=env).stdout
    assert help_page.startswith("stat-exp: prune a trained transformer")
    report = subprocess.run([str(venv / "bin" / "stat-exp-report"), str(run_dir), "--out", str(tmp_path / "report")],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "report.md").is_file()
