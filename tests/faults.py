"""`python -m tests.faults FAULT <overrides>`: `stat-exp <overrides>` with one fault injected, so the
tests of how a run ends (tests/test_exits.py) see real processes, signals and exit codes.

Faults: sigint (Ctrl-C while the model is evaluated), bug (an exception no one expects, in the
evaluation), bug_before_job (the same before Hydra starts a job), disk_full_on_save (ENOSPC while the
model is saved), disk_full (ENOSPC on every fsync: nothing can be written durably), read_only
(every write under the folder in $READ_ONLY_DIR is refused, as on a read-only mount; also for root).
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import sys
import time
from pathlib import Path


def _sigint(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)  # interrupted long before this ends


def _bug(*args, **kwargs):
    raise RuntimeError("injected bug")


def _disk_full_on_save(model, tokenizer, folder, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(folder) / "model.safetensors"))


def _fsync_disk_full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _read_only(folder: Path) -> None:
    """Refuse writes under `folder` the way a read-only file system does (EROFS)."""
    def refused(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(folder)

    def deny(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if refused(file) and any(c in mode for c in "wax+"):
            deny(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if refused(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            deny(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if refused(path):
            deny(path)
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = open_
    os.open, os.mkdir = os_open, mkdir


def inject(fault: str) -> None:
    import stat_exp.config.cli
    import stat_exp.pipeline
    import stat_exp.run

    if fault == "sigint":
        stat_exp.pipeline.evaluate = _sigint
    elif fault == "bug":
        stat_exp.pipeline.evaluate = _bug
    elif fault == "bug_before_job":
        stat_exp.run.command_line = _bug
    elif fault == "disk_full_on_save":
        stat_exp.pipeline.save_pruned = _disk_full_on_save
    elif fault == "disk_full":
        os.fsync = _fsync_disk_full
    elif fault == "read_only":
        _read_only(Path(os.environ["READ_ONLY_DIR"]).resolve())
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    fault = sys.argv.pop(1)
    inject(fault)
    from stat_exp.run import main

    main()
