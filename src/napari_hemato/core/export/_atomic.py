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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(dest: Path) -> None:
    """Remove what killed exports to ``dest`` left behind (see the module notes)."""
    for tag in ("old", "tmp"):  # "old" first: a lone previous version is restored
        for path in sorted(dest.parent.glob(f".*.{tag}-{dest.name}")):
            pid = path.name[1:].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
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
