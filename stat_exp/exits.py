"""How a command ends on the terminal: one line and an exit code, never a traceback.

- bad input (a UserError, or Hydra's own config and override errors): `error: <message>`, exit 2;
- outputs that cannot be written (a full disk, a read-only folder): `error: cannot write <what>:
  <reason>`, exit 1;
- Ctrl-C: `interrupted`, exit 130 (the run's results.json says failed, "interrupted");
- anything else: `internal error: <type>: <message> (traceback in <log>)`, exit 1, where <log> is
  the job's log file (<run_dir>/run.log) or, before a job has one, a temporary file.
"""
from __future__ import annotations

import errno
import logging
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.errors import CompactHydraException, InstantiationException

from stat_exp.errors import UserError, first_line

BAD_INPUT, FAILED, INTERRUPTED = 2, 1, 130
# errors of writing outputs that the user's environment causes, not the code
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
TRACE_LOGGER = "stat_exp.trace"  # writes to the job's log file only (conf/hydra/job_logging)
_logged: set[int] = set()  # ids of the exceptions whose traceback a job's log already holds


def log_failure(exc: BaseException) -> None:
    """Put a job's failure, with its traceback, in the job's log file (never the terminal)."""
    logging.getLogger(TRACE_LOGGER).info("job failed", exc_info=exc)
    _logged.add(id(exc))


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def user_error(exc: BaseException) -> BaseException | None:
    """The bad-input error behind `exc` (also when Hydra's instantiate wrapped it), else None."""
    for e in _chain(exc):
        if isinstance(e, UserError):
            return e
        if isinstance(e, CompactHydraException) and not isinstance(e, InstantiationException):
            return e  # composition, override and search-path errors: the command line's
    return None


def write_error(exc: BaseException) -> OSError | None:
    """The OSError of an output that could not be written (disk full, no permission), else None."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in WRITE_ERRNOS), None)


def _say(line: str, code: int) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def exit_cleanly(command: Callable[[], None]) -> None:
    """Run `command`; whatever it raises ends as one line on stderr and its exit code."""
    try:
        command()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        _say("interrupted", INTERRUPTED)
    except BaseException as exc:  # noqa: BLE001 - every failure ends in one line, by design
        user = user_error(exc)
        if user is not None:
            _say(f"error: {first_line(user)}", BAD_INPUT)
        written = write_error(exc)
        if written is not None:
            what = f" {written.filename}" if written.filename else ""
            _say(f"error: cannot write{what}: {written.strerror or written}", FAILED)
        _say(f"internal error: {type(exc).__name__}: {first_line(exc)} (traceback in {save_traceback(exc)})", FAILED)


def save_traceback(exc: BaseException) -> Path:
    """The job's log file, with the traceback appended unless the job logged it (a temporary file
    when there is no job log yet)."""
    text = "".join(traceback.format_exception(exc))
    for handler in logging.getLogger(TRACE_LOGGER).handlers:
        if isinstance(handler, logging.FileHandler):
            if id(exc) in _logged:
                return Path(handler.baseFilename)
            try:
                with open(handler.baseFilename, "a", encoding="utf-8") as log:
                    log.write(text)
                return Path(handler.baseFilename)
            except OSError:
                break
    with tempfile.NamedTemporaryFile("w", prefix="stat-exp-", suffix=".log", delete=False) as log:
        log.write(text)
    return Path(log.name)
