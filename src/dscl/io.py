"""Files every part of dscl writes: atomic writes (bytes, text, JSON, CSV, figures), JSON reads and durations.

Every file is written through a temp file in the same folder that is then ``os.replace``-d into
place, so a crash, Ctrl-C or a full disk never leaves half a checkpoint, report, CSV or plot behind
(the previous version, if any, stays as it was). This is the ONE atomic writer of the package.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from dscl.errors import DsclError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` through ``write(fh)`` on a temp file in the same folder (flushed and fsync-ed),
    then ``os.replace`` it into place; the temp file is removed if anything fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> Path:
    """``text`` as UTF-8, atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """``obj`` as indented JSON (``dumps``: extra :func:`json.dumps` arguments), atomically."""
    return write_text(path, json.dumps(obj, indent=2, **dumps) + "\n")


def write_csv(path: str | Path, header: Sequence[str], rows: Any) -> Path:
    """``rows`` (an iterable of sequences) under ``header`` as a UTF-8 CSV file, written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def save_figure(fig: Any, path: str | Path, *, close: bool = False) -> Path:
    """A matplotlib figure as PNG, atomically (``close``: close the figure afterwards, even on errors)."""
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)


class DamagedFileError(DsclError, ValueError):
    """A file dscl wrote earlier that no longer parses (edited by hand, truncated by a copy)."""


def read_json(path: str | Path, *, what: str = "") -> Any:
    """The JSON in ``path``; a file that does not parse is a :class:`DamagedFileError` naming the file, the line and
    column, and (``what``) the command that writes it again, instead of a bare JSONDecodeError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = (f"line {exc.lineno}, column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError)
                 else str(exc))
        fix = f"; {what}" if what else "; restore it or rerun the command that wrote it"
        raise DamagedFileError(f"{path}: not valid JSON ({where}): the file was edited or damaged{fix}") from None


def format_duration(seconds: float) -> str:
    """``mm:ss`` (``h:mm:ss`` from one hour) for progress lines and estimates."""
    total = max(0, round(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
