"""The results contract: one results.json per run, written atomically so a sweep never sees half a file."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
STATUSES = ("ok", "failed", "running")
# Distribution names whose versions make a result reproducible; the key is what results.json shows.
_DISTRIBUTIONS = {
    "torch": "torch",
    "transformers": "transformers",
    "lm_eval": "lm_eval",
    "hydra-core": "hydra-core",
    "wandb": "wandb",
    "numpy": "numpy",
    "stat_exp": "stat-exp",
}


def _jsonable(value: Any) -> Any:
    """Let numpy/torch scalars and arrays, and paths, through json.dump; anything else is a bug."""
    if isinstance(value, Path):
        return str(value)
    for method in ("item", "tolist"):
        if callable(getattr(value, method, None)):
            return getattr(value, method)()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write data as JSON so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a write or fsync error: name the file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def versions() -> dict[str, str]:
    """Versions of the packages that decide a result; packages not installed are left out."""
    found = {"python": platform.python_version()}
    for key, dist in _DISTRIBUTIONS.items():
        try:
            found[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


# Keys that do not change what a job computes: tracking, resuming, progress bars, the sweeper's objective.
NOT_HASHED = ("hydra", "logger", "resume", "progress", "objective")


def config_hash(config: dict, exclude: tuple[str, ...] = NOT_HASHED) -> str:
    """Short, stable id of a resolved config; keys that do not change the experiment are left out."""
    kept = {k: v for k, v in config.items() if k not in exclude}
    text = json.dumps(kept, sort_keys=True, default=str)
    return sha256(text.encode("utf-8")).hexdigest()[:12]


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass(kw_only=True)
class RunRecord:
    """What one run writes to results.json; the fields are the results contract (README, "Results contract")."""

    status: str = "running"
    error: str | None = None
    model: str
    pruner: str
    factorization: str | None = None
    target: dict[str, float] = field(default_factory=dict)
    achieved: dict[str, float] = field(default_factory=dict)
    structure: dict[str, list[int]] = field(default_factory=dict)
    dense_structure: dict[str, list[int]] = field(default_factory=dict)  # the same counts before pruning
    # the global allocation's plan: which candidate won on held-out batches, every candidate's score
    allocation: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    timing_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None  # torch.cuda.max_memory_allocated, on CUDA
    execution: dict[str, str] = field(default_factory=dict)  # offload, stream, factors as resolved
    plan: dict[str, Any] = field(default_factory=dict)  # the planner's prediction, beside the measurement
    calibration: dict[str, Any] = field(default_factory=dict)  # its size and whether it was enough (data.calib_size)
    seed: int | None = None
    config_hash: str = ""
    versions: dict[str, str] = field(default_factory=versions)
    variant: str | None = None
    tracker: str | None = None  # where the logger keeps this run (a W&B link or folder, a CSV file)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, run_dir: Path) -> Path:
        """Write results.json into run_dir and return its path."""
        path = Path(run_dir) / RESULTS_FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord | None:
        """The record in run_dir/results.json; None when there is none or it does not parse."""
        path = Path(run_dir) / RESULTS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in names})
        except (OSError, ValueError, TypeError):
            return None


class Timings:
    """Wall-clock seconds per stage; `with timings("prune"):` adds to the "prune" entry."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _all(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda d: isinstance(d, dict) and all(check(v) for v in d.values())


# Each contract key with a check and the words for the error message, in the order of RunRecord's fields.
_SCHEMA = {
    "status": (lambda v: v in STATUSES, f"one of {', '.join(STATUSES)}"),
    "error": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "model": (lambda v: isinstance(v, str), "a string"),
    "pruner": (lambda v: isinstance(v, str), "a string"),
    "factorization": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "target": (_all(_is_number), "a dict of numbers"),
    "achieved": (_all(_is_number), "a dict of numbers"),
    "structure": (_all(lambda v: isinstance(v, list)), "a dict of per-layer lists"),
    "dense_structure": (_all(lambda v: isinstance(v, list)), "a dict of per-layer lists"),
    "allocation": (lambda v: isinstance(v, dict), "a dict"),
    "metrics": (_all(_is_number), "a dict of numbers"),
    "timing_s": (_all(_is_number), "a dict of numbers"),
    "peak_rss_mb": (_is_number, "a number"),
    "peak_device_mb": (lambda v: v is None or _is_number(v), "a number or null"),
    "execution": (_all(lambda v: isinstance(v, str)), "a dict of strings"),
    "plan": (lambda v: isinstance(v, dict), "a dict"),
    "calibration": (lambda v: isinstance(v, dict), "a dict"),
    "seed": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer or null"),
    "config_hash": (lambda v: isinstance(v, str), "a string"),
    "versions": (_all(lambda v: isinstance(v, str)), "a dict of strings"),
    "variant": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "tracker": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def validate_results(d: dict) -> None:
    """Raise ValueError naming the first key of results.json that is missing or of the wrong type."""
    for key, (check, expected) in _SCHEMA.items():
        if key not in d:
            raise ValueError(f"results.json: missing key {key!r}")
        if not check(d[key]):
            raise ValueError(f"results.json: {key!r} must be {expected}, got {d[key]!r}")
    if d["status"] == "failed" and not d["error"]:
        raise ValueError("results.json: 'error' must say why when status is 'failed'")
