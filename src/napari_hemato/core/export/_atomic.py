"""Safe destinations: every export appears whole or not at all.

Exporters build their output under a temporary name beside the destination
(same folder, so the final :func:`os.replace` is an atomic rename on the same
file system) and only rename it into place once everything is written. A
failure removes the temporary output, so no partial file or folder is left.

A process killed with SIGKILL cannot clean up: its temporary names carry its pid
(``.<pid>-<random>.tmp-<name>``, ``.<pid>-<random>.old-<name>`` for a folder being
replaced), and the next export to the same destination removes those of
processes that no longer run, after renaming a lone ``.old-`` folder back when
the kill came between its two renames (the previous export is restored whole).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from napari_hemato.core.errors import HematoError
from napari_hemato.core.processes import pid_alive

__all__ = ["ExportError", "atomic_outputs", "check_destination"]

log = logging.getLogger(__name__)


class ExportError(HematoError, ValueError):
    """An export or import failed: bad destination, existing output, unreadable file."""


def check_destination(dest: str | os.PathLike, *, overwrite: bool = False,
                      base_dir: str | os.PathLike | None = None) -> Path:
    """Validate an export destination and return it as an absolute path.

    Parameters
    ----------
    dest : path
        File or folder to write (relative to the working directory).
    overwrite : bool
        Allow replacing an existing file or folder.
    base_dir : path, optional
        When given, ``dest`` must resolve (following symlinks) inside it.

    Returns
    -------
    Path
        The absolute destination (symlinks in the parent folders resolved).

    Raises
    ------
    ExportError
        ``dest`` exists and ``overwrite`` is False, escapes ``base_dir``, or its
        parent is not a writable folder.

    Examples
    --------
    >>> check_destination("/tmp/out/cells.csv", base_dir="/tmp/out")  # doctest: +SKIP
    PosixPath('/tmp/out/cells.csv')
    """
    dest = Path(dest).expanduser()
    if base_dir is not None:
        base = Path(os.path.realpath(Path(base_dir).expanduser()))
        real = Path(os.path.realpath(dest))
        if real != base and base not in real.parents:
            raise ExportError(f"cannot write {dest}: it resolves to {real}, outside {base}")
    dest = Path(os.path.abspath(dest))
    parent = Path(os.path.realpath(dest.parent))
    dest = parent / dest.name
    if not dest.name or dest.name in (".", ".."):
        raise ExportError(f"cannot write {dest}: not a file or folder name")
    if os.path.lexists(dest) and not overwrite:
        raise ExportError(f"{dest} already exists (pass overwrite=True to replace it)")
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"cannot write {dest}: {parent} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot write {dest}: cannot create folder {parent} ({exc})") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {dest}: folder {parent} is not writable")
    return dest


def _temp_name(dest: Path, tag: str) -> Path:
    # The real name stays at the end so writers that look at the suffix behave.
    return dest.with_name(f".{os.getpid()}-{secrets.token_hex(4)}.{tag}-{dest.name}")



def clean_leftovers(dest: Path) -> None:
    """Remove what killed exports to ``dest`` left behind (see the module notes)."""
    for tag in ("old", "tmp"):  # "old" first: a lone previous version is restored
        for path in sorted(dest.parent.glob(f".*.{tag}-{dest.name}")):
            pid = path.name[1:].split("-", 1)[0]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            if tag == "old" and not os.path.lexists(dest):
                with contextlib.suppress(OSError):
                    os.replace(path, dest)
                    log.warning("%s: restored the previous export (an export was interrupted)", dest)
                    continue
            _remove(path)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def _commit(tmp: Path, dest: Path, overwrite: bool) -> None:
    if tmp.is_dir():
        if os.path.lexists(dest):
            if not overwrite:
                raise ExportError(f"{dest} already exists (pass overwrite=True to replace it)")
            aside = _temp_name(dest, "old")
            os.replace(dest, aside)
            try:
                os.replace(tmp, dest)
            except OSError:
                os.replace(aside, dest)
                raise
            _remove(aside)
        else:
            os.replace(tmp, dest)
    elif overwrite:
        if dest.is_dir() and not dest.is_symlink():
            raise ExportError(f"cannot replace folder {dest} by a file")
        os.replace(tmp, dest)
    else:  # a hard link fails if someone created dest in the meantime
        try:
            os.link(tmp, dest)
        except FileExistsError as exc:
            raise ExportError(f"{dest} already exists (pass overwrite=True to replace it)") from exc
        except OSError:  # file system without hard links
            if os.path.lexists(dest):
                raise ExportError(f"{dest} already exists (pass overwrite=True to replace it)") from None
            os.replace(tmp, dest)
            return
        tmp.unlink()


@contextlib.contextmanager
def atomic_outputs(dests: Sequence[str | os.PathLike], *, overwrite: bool = False,
                   base_dir: str | os.PathLike | None = None,
                   folders: Sequence[bool] | bool = False) -> Iterator[list[Path]]:
    """Temporary paths to write, renamed onto ``dests`` when the block succeeds.

    Parameters
    ----------
    dests : sequence of path
        Final destinations (checked with :func:`check_destination`).
    overwrite, base_dir
        As for :func:`check_destination`.
    folders : bool or sequence of bool
        Which destinations are folders: their temporary folder is created
        empty; for files only a free name is given (the writer creates it).

    Yields
    ------
    list of Path
        One temporary path per destination, in the same folder.

    Raises
    ------
    ExportError
        A bad destination, or an :class:`OSError` while writing or renaming.
        Temporary output is removed on any error.

    Examples
    --------
    >>> with atomic_outputs(["cells.csv"]) as (tmp,):  # doctest: +SKIP
    ...     table.to_csv(tmp)
    """
    finals = [check_destination(d, overwrite=True, base_dir=base_dir) for d in dests]
    for dest in finals:
        clean_leftovers(dest)
    if not overwrite:
        finals = [check_destination(d, overwrite=False, base_dir=base_dir) for d in dests]
    is_dir = [folders] * len(finals) if isinstance(folders, bool) else list(folders)
    temps = [_temp_name(d, "tmp") for d in finals]
    try:
        for tmp, make_dir in zip(temps, is_dir, strict=True):
            if make_dir:
                tmp.mkdir()
        yield temps
        new = [not os.path.lexists(d) for d in finals]
        done: list[Path] = []
        try:
            for tmp, dest in zip(temps, finals, strict=True):
                _commit(tmp, dest, overwrite)
                done.append(dest)
        except BaseException:  # keep a multi-file output all-or-nothing
            for dest, fresh in zip(done, new, strict=False):
                if fresh:
                    _remove(dest)
            raise
        for dest in finals:
            log.info("wrote %s", dest)
    except OSError as exc:
        raise ExportError(f"cannot write {finals[0]}: {exc}") from exc
    finally:
        for tmp in temps:
            _remove(tmp)


# -- reading untrusted files ---------------------------------------------------------------
#: Limits every importer enforces, so a hostile or broken file fails fast with a one-line
#: :class:`ExportError` instead of exhausting memory or time. Module attributes: raise them
#: here for unusually large (but trusted) files.
MAX_FILE_BYTES = 512 * 2**20  # one JSON or CSV file, parsed in memory
MAX_OBJECTS = 2_000_000  # rows / features / annotations in one file
MAX_VERTICES = 100_000  # in one object's outline (a cell outline has tens to hundreds)
MAX_TOTAL_VERTICES = 50_000_000  # in one file (COCO: with the run lengths)
MAX_RLE_RUNS = 1_000_000  # run-length values of one COCO mask
MAX_LABEL_PIXELS = 2**29  # a label image (2 GiB as uint32)
MAX_RASTER_WORK = 20_000_000  # edge-row crossings of one outline (memory of rasterising it)
MAX_LABEL_ID = 2**32 - 1  # label values are uint32; 0 is background
MAX_ID = 2**53  # point ids: integers a float64 holds exactly


def read_guarded(path, what: str, read, *args, **kwargs):
    """``read(path, ...)``, with any error a malformed file can cause as one ExportError line."""
    try:
        return read(path, *args, **kwargs)
    except ExportError:
        raise
    except MemoryError:
        raise ExportError(f"{path}: too large to read as {what}") from None
    except RecursionError:
        raise ExportError(f"{path}: not a valid {what} file (nested too deeply)") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise ExportError(f"{path}: not a valid {what} file ({detail})") from None


def check_file_size(path) -> Path:
    """``path`` as a Path, refusing files over :data:`MAX_FILE_BYTES` (before reading them)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from None
    if size > MAX_FILE_BYTES:
        raise ExportError(f"{path}: {size / 2**20:.0f} MiB, more than the {MAX_FILE_BYTES / 2**20:.0f} "
                          "MiB an import reads (napari_hemato.core.export._atomic.MAX_FILE_BYTES)")
    return path


def check_count(n: int, path, what: str = "objects") -> int:
    if n > MAX_OBJECTS:
        raise ExportError(f"{path}: {n} {what}, more than the {MAX_OBJECTS} an import reads")
    return n


def check_vertices(n: int, path, oid, total: int) -> int:
    """Count one object's ``n`` vertices into ``total``; refuse too many."""
    if n > MAX_VERTICES:
        raise ExportError(f"{path}: object {oid} has {n} vertices, more than {MAX_VERTICES}")
    total += n
    if total > MAX_TOTAL_VERTICES:
        raise ExportError(f"{path}: more than {MAX_TOTAL_VERTICES} vertices in all")
    return total


def check_coords(xy, path, oid):
    """``xy`` as a finite float (N, 2) array of pixel coordinates."""
    import numpy as np

    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if not np.isfinite(xy).all() or (np.abs(xy) > 2**31).any():
        raise ExportError(f"{path}: object {oid} has non-finite or out-of-range coordinates")
    return xy


def check_rings(rings: list, path, oid) -> list:
    """Refuse an outline whose rasterisation would cost more than :data:`MAX_RASTER_WORK`."""
    import numpy as np

    work = 0
    for xy in rings:
        if len(xy):
            rows = np.ceil(xy[:, 1] - 0.5)
            work += int(np.abs(np.diff(rows, append=rows[:1])).sum())
    if work > MAX_RASTER_WORK:
        raise ExportError(f"{path}: object {oid}'s outline crosses {work} pixel rows, more than "
                          f"{MAX_RASTER_WORK}")
    return rings


def check_label_shape(shape, path) -> tuple[int, int]:
    """A label image's (h, w) as ints, refusing negative or over :data:`MAX_LABEL_PIXELS`."""
    h, w = (_integer(v, path, "label image size") for v in shape)
    if h < 0 or w < 0 or h * w > MAX_LABEL_PIXELS:
        raise ExportError(f"{path}: a {h} x {w} label image is out of range "
                          f"(at most {MAX_LABEL_PIXELS} pixels)")
    return h, w


def check_origin(origin, path) -> tuple[int, int]:
    y0, x0 = (_integer(v, path, "origin") for v in origin)
    if abs(y0) > 2**31 or abs(x0) > 2**31:
        raise ExportError(f"{path}: origin {origin} is out of range")
    return y0, x0


def check_id(value, path, *, label: bool = True) -> int:
    """An object id: an integer, 1..2**32-1 for label values (0..2**53 for points)."""
    oid = _integer(value, path, "object id")
    top = MAX_LABEL_ID if label else MAX_ID
    if not (1 if label else 0) <= oid <= top:
        raise ExportError(f"{path}: object id {value!r} is out of range (1..{top})")
    return oid


def check_ids(ids, path, *, label: bool = True) -> None:
    """Every id valid (see :func:`check_id`) and none repeated."""
    import numpy as np

    values = np.asarray(ids)
    if values.dtype.kind not in "iu":
        values = np.asarray([check_id(v, path, label=label) for v in values.tolist()], np.int64)
    elif values.size:
        bad = values[(values < (1 if label else 0)) | (values > (MAX_LABEL_ID if label else MAX_ID))]
        if bad.size:
            check_id(int(bad[0]), path, label=label)
    uniq, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        raise ExportError(f"{path}: object id {uniq[counts > 1][0]} appears {counts.max()} times")


def _integer(value, path, what: str) -> int:
    if isinstance(value, bool) or value is None:
        raise ExportError(f"{path}: {what} {value!r} is not an integer")
    try:
        f = float(value)
        i = int(value) if not isinstance(value, str) else int(f)
    except (TypeError, ValueError, OverflowError):
        raise ExportError(f"{path}: {what} {value!r} is not an integer") from None
    if f != i:
        raise ExportError(f"{path}: {what} {value!r} is not an integer")
    return i


def inside(folder, rel, path) -> Path:
    """``folder / rel`` for a relative name that stays inside ``folder`` (no ``..``, not absolute)."""
    text = str(rel)
    parts = Path(text).parts
    if not text or Path(text).is_absolute() or ".." in parts or "\\" in text or "\0" in text:
        raise ExportError(f"{path}: refusing the file name {text!r} (absolute or outside {folder})")
    target = Path(folder) / text
    real, base = os.path.realpath(target), os.path.realpath(folder)
    if real != base and not real.startswith(base + os.sep):
        raise ExportError(f"{path}: refusing the file name {text!r} (resolves outside {folder})")
    return target
