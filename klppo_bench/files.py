"""Files as the package writes and reads them: atomically, with one-line errors, at the
store's file mode, and parquet without Arrow's thread pools.

* :func:`atomic_write_bytes` (and its JSON / parquet forms): a temporary file in the same
  directory renamed into place, so a reader never sees a truncated file under a final name;
  any ``OSError`` becomes a :class:`WriteError` (one line: the path and the OS's reason,
  ``disk full`` for ENOSPC), and no temporary file survives a failed write.
* :func:`check_output_dir`: an output location that is a file or cannot be written is a
  :class:`~klppo_bench.errors.ConfigError` before anything runs.
* :func:`parquet_bytes` / :func:`read_parquet`: see why there.

:mod:`klppo_bench.store` re-exports all of it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from klppo_bench.errors import ConfigError

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
"""Every result file's mode (0644 under the usual umask): ``mkstemp`` alone makes 0600."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteError(OSError):
    """A file could not be written (disk full, read-only, not a directory...): ``str()`` is
    one line naming the path and the OS's reason, ``disk full (...)`` for ENOSPC / EDQUOT.
    A run that fails with it failed because of where it writes, not for its own reason."""

    def __init__(self, path: Path | str, err: OSError):
        super().__init__(err.errno, err.strerror or str(err), str(path))
        self.path = Path(path)

    def __str__(self) -> str:
        why = self.strerror
        if self.errno in DISK_FULL:
            why = f"disk full ({why})"
        return f"cannot write {self.path}: {why}"


def write_error(path: Path | str, err: OSError) -> WriteError:
    """``err`` as a :class:`WriteError` naming ``path`` (kept as it is if it already is one)."""
    return err if isinstance(err, WriteError) else WriteError(path, err)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, renamed
    into place. On any failure the temporary file is removed and an ``OSError`` is raised as
    a :class:`WriteError`; ``path`` keeps its previous content."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; results are shared files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError):
            raise write_error(path, err) from err
        raise


def check_output_dir(path: Path | str, what: str) -> None:
    """Raise :class:`~klppo_bench.errors.ConfigError` (one line) unless ``path`` is a
    directory this process can write into, or can be created as one (its nearest existing
    ancestor is a writable directory). Creates nothing."""
    path = Path(path)
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "it" if probe == path else str(probe)
        raise ConfigError(f"{what} {path}: {where} is a file, not a directory; allowed: a "
                          "directory, or a path where one can be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "read-only file system" if read_only else "permission denied"
        raise ConfigError(f"{what} {path}: {probe} cannot be written ({why}); allowed: a "
                          "writable directory")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True).encode())


def parquet_bytes(df: pd.DataFrame) -> bytes:
    """``df`` (its index left out) as a parquet file's bytes, encoded on the calling thread.

    Parquet goes through this and :func:`read_parquet`, never pandas' own parquet functions.
    ``pandas.read_parquet`` of a local path opens the file in Python and reads it through
    Arrow's dataset scanner, whose read-ahead runs on Arrow's thread pools and can release
    its last buffers (Python objects) on a pool thread after the read has returned. If that
    happens while the interpreter finalizes at exit, the thread's ``PyGILState_Ensure`` makes
    CPython end it with ``pthread_exit``; the forced unwind meets a ``noexcept`` destructor
    and the process aborts after its work is done (``terminate called without an active
    exception``, exit 134; core dump of pyarrow 26.0.1 under Python 3.11, about 1 in 100
    processes that import torch, ``benchmarks/exit_abort.py``). Here Python reads and writes
    the bytes and Arrow encodes and decodes them in memory on the calling thread: the pools
    never start, no other thread ever holds a buffer. Same tables, same dtypes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.Table.from_pandas(df, preserve_index=False, nthreads=1)
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    # Lossless, and what results/reference/ ships: zstd level 19 (a 1M-frame run's
    # metrics.parquet 58 KB instead of 73 KB with Arrow's default, snappy), float columns
    # byte-stream-split instead of dictionary-encoded, no min/max statistics (the reader reads
    # whole files): 17% smaller again on a sample of 23 shipped tables (912 -> 755 KB), ~0.1 s
    # once per finished run.
    pq.write_table(table, buf, compression="zstd", compression_level=19,
                   use_dictionary=[n for n in table.column_names if n not in floats],
                   use_byte_stream_split=floats, write_statistics=False)
    return buf.getvalue()


def read_parquet(path: Path | str) -> pd.DataFrame:
    """A parquet file as a DataFrame, decoded without Arrow's thread pools (see
    :func:`parquet_bytes`); raises what ``pandas.read_parquet`` would (``FileNotFoundError``,
    ``pyarrow.ArrowInvalid`` for a file that is not parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = Path(path).read_bytes()
    return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False).to_pandas(
        use_threads=False)


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    atomic_write_bytes(path, parquet_bytes(df))
