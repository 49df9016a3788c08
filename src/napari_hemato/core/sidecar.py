"""Autosave of corrections in a sidecar folder next to the image.

``<image>.hemato/<name>/`` holds one annotation set: ``objects.csv`` (the
corrected table), ``labels.npz`` (the label image, instances only) and
``meta.json`` (kind, classes, origin, µm/px, image, revision). When the image's
folder is read-only, or inside the installed package (its bundled samples), the sidecar goes to the user's cache
(``~/.cache/napari-hemato/sidecars/<hash>``) instead.

Crash safety: each save builds the new version in a temporary folder
(``.<name>.<random>``) and swaps it in by two renames (old version to
``.<name>.old``, new one into place). A process killed at any point leaves
either version whole: the next save or load renames a lone ``.<name>.old`` back
and removes the temporary folders. A save that fails (disk full) raises
:class:`~napari_hemato.core.errors.WriteError` naming the file and leaves the
previous version as it was.

Two viewers (processes) saving the same set: no update is lost. A save holds
the lock file ``.<name>.lock`` (created with ``O_EXCL``; it holds the pid and
host; a lock whose process is gone is taken over) while it checks and swaps.
Every version carries a random ``revision``; :func:`load_annotations` puts it in
``metadata["sidecar_revision"]`` and :func:`save_annotations` records the new
one there. A save based on an older revision than the one on disk (another
viewer saved meanwhile) does not replace it: it is written beside it as
``<name> (copy N)``, and the returned path says so. Reopening the image shows
both sets.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from napari_hemato.core.annotations import AnnotationSet
from napari_hemato.core.errors import StoreError, WriteError
from napari_hemato.core.processes import pid_alive
from napari_hemato.core.table import read_table_csv

REVISION = "sidecar_revision"
#: how long a save waits for another process's save of the same set to finish
LOCK_WAIT_S = 30.0

log = logging.getLogger(__name__)
#: the installed package: nothing is ever written inside it (its samples' sidecars go to the cache)
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def sidecar_dir(image_path: str | Path, *, create: bool = False) -> Path:
    """The sidecar folder of an image (next to it when writable, else in the cache)."""
    image_path = Path(image_path).resolve()
    beside = image_path.with_name(image_path.name + ".hemato")
    cache = _cache_dir(image_path)
    in_package = image_path.is_relative_to(PACKAGE_DIR)
    for existing in (cache,) if in_package else (beside, cache):
        if existing.is_dir():
            return existing
    target = beside if os.access(image_path.parent, os.W_OK) and not in_package else cache
    if create:
        target.mkdir(parents=True, exist_ok=True)
        if target == cache:
            (cache / "image_path.txt").write_text(str(image_path))
    return target


def _cache_dir(image_path: Path) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    digest = hashlib.sha1(str(image_path).encode()).hexdigest()[:16]
    return root / "napari-hemato" / "sidecars" / digest


def save_annotations(ann: AnnotationSet, folder: str | Path) -> Path:
    """Atomically (re)write one annotation set into ``folder``; returns where it went.

    That is ``folder`` unless another viewer saved a newer revision there since
    ``ann`` was loaded: then ``ann`` goes to a new ``<name> (copy N)`` beside it
    (see the module notes). ``ann.metadata["sidecar_revision"]`` is set to the
    revision written.
    """
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(err, folder.parent) from err
    with _locked(folder):
        _recover(folder)
        on_disk = _revision(folder)
        if folder.exists() and on_disk is not None and ann.metadata.get(REVISION) != on_disk:
            target = _free_copy_name(folder)
            log.warning("%s changed since it was loaded (another viewer saved it); this version "
                        "is saved as %s", folder, target.name)
            if target != folder:
                with _locked(target):
                    return _write(ann, target)
        return _write(ann, folder)


def _write(ann: AnnotationSet, folder: Path) -> Path:
    revision = uuid.uuid4().hex
    try:
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    except OSError as err:
        raise _write_error(err, folder) from err
    try:
        ann.table.to_csv(tmp / "objects.csv", index=False)
        if ann.labels is not None:
            np.savez_compressed(tmp / "labels.npz", labels=np.asarray(ann.labels, np.uint32))
        meta = {
            "kind": ann.kind, "class_names": list(ann.class_names), "origin": list(ann.origin),
            "mpp": ann.mpp, "image_path": ann.image_path,
            "image_shape": list(ann.image_shape) if ann.image_shape else None,
            "metadata": {k: v for k, v in ann.metadata.items() if k != REVISION},
            "revision": revision,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(err, folder) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ann.metadata[REVISION] = revision
    return folder


def _write_error(err: OSError, folder: Path) -> WriteError:
    if isinstance(err, WriteError):
        return err
    where = err.filename or folder
    return WriteError(f"{where}: cannot save the corrections ({err.strerror or err}); "
                      f"the previous version of {folder.name} is kept", err.errno or errno.EIO)


def _recover(folder: Path) -> None:
    """Finish or undo a save a killed process left half done (call with the lock held)."""
    old = folder.with_name(f".{folder.name}.old")
    if old.is_dir() and not folder.exists() and (old / "meta.json").is_file():
        os.replace(old, folder)  # killed between the two renames: the old version is the last whole one
        log.warning("%s: restored the last complete version (a save was interrupted)", folder)
    for tmp in folder.parent.glob(f".{folder.name}.*"):
        rest = tmp.name[len(folder.name) + 2:]  # mkdtemp's 8 characters, or "old"
        if tmp.is_dir() and (rest == "old" or (len(rest) == 8 and "." not in rest)):
            shutil.rmtree(tmp, ignore_errors=True)


def _revision(folder: Path) -> str | None:
    try:
        return json.loads((folder / "meta.json").read_text()).get("revision")
    except (OSError, ValueError, AttributeError):
        return None


def _free_copy_name(folder: Path) -> Path:
    k = 1
    while True:
        target = folder.with_name(f"{folder.name} (copy {k})")
        if not target.exists():
            return target
        k += 1


@contextlib.contextmanager
def _locked(folder: Path):
    """Hold ``.<name>.lock`` beside ``folder`` (O_EXCL; a dead holder's lock is taken over)."""
    lock = folder.with_name(f".{folder.name}.lock")
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _stale(lock):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            if time.monotonic() > deadline:
                raise StoreError(f"{folder}: another process is saving it (lock {lock}); "
                                 "try again") from None
            time.sleep(0.02)
            continue
        except OSError as err:
            raise _write_error(err, folder) from err
        break
    try:
        try:
            os.write(fd, me.encode())
        except OSError as err:  # disk full: an empty lock file still excludes others
            log.debug("%s: %s", lock, err)
        finally:
            os.close(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def _stale(lock: Path) -> bool:
    """A lock is stale when its process is gone (same host) or it is unreadable and old."""
    try:
        holder = json.loads(lock.read_text())
        pid, host = int(holder["pid"]), holder["host"]
    except FileNotFoundError:
        return False  # released meanwhile: just retry
    except (OSError, ValueError, KeyError, TypeError):
        try:  # being written right now, or left empty by a full disk
            return time.time() - lock.stat().st_mtime > 10.0
        except FileNotFoundError:
            return False
    if host != socket.gethostname():
        return time.time() - float(holder.get("time", 0)) > 600.0
    return not pid_alive(pid)


def load_annotations(folder: str | Path) -> AnnotationSet:
    """Read an annotation set written by :func:`save_annotations`."""
    folder = Path(folder)
    if not folder.exists() and folder.with_name(f".{folder.name}.old").is_dir():
        with _locked(folder):
            _recover(folder)
    meta = json.loads((folder / "meta.json").read_text())
    table = read_table_csv(folder / "objects.csv")
    labels = None
    if (folder / "labels.npz").exists():
        with np.load(folder / "labels.npz", allow_pickle=False) as data:
            labels = data["labels"]
    return AnnotationSet(
        kind=meta["kind"], table=table, class_names=meta["class_names"], labels=labels,
        origin=tuple(meta["origin"]), mpp=meta["mpp"], image_path=meta["image_path"],
        image_shape=tuple(meta["image_shape"]) if meta["image_shape"] else None,
        metadata={**(meta.get("metadata") or {}), **({REVISION: meta["revision"]}
                                                      if meta.get("revision") else {})},
    )


def saved_sets(image_path: str | Path) -> dict[str, Path]:
    """Name -> folder of every annotation set saved for an image."""
    folder = sidecar_dir(image_path)
    if not folder.is_dir():
        return {}
    for old in folder.glob(".*.old"):  # a save killed between its two renames
        name = old.name[1:-len(".old")]
        if not (folder / name).exists():
            with contextlib.suppress(OSError, StoreError), _locked(folder / name):
                _recover(folder / name)
    return {p.name: p for p in sorted(folder.iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").exists()}


def autosave(ann: AnnotationSet, name: str) -> Path | None:
    """Save ``ann`` as the set ``name`` beside its image; None when it cannot be placed.

    The one autosave of the plugin: the Analyse widget saves new results with it and
    the Review widget every batch of corrections. Sets without an existing image are
    skipped; a lazy whole-slide set (``metadata["lazy"]``) saves its table only, its
    labels stay in the run's store (``metadata["result"]``).
    """
    if not ann.image_path or not Path(ann.image_path).exists():
        return None
    if ann.kind == "instances" and ann.labels is None and not ann.metadata.get("lazy"):
        return None
    return save_annotations(ann, sidecar_dir(ann.image_path, create=True) / name)


def discard_set(image_path: str | Path, name: str) -> bool:
    """Remove the saved set ``name`` of an image (an edit window once saved into its slide);
    whether there was one."""
    folder = sidecar_dir(image_path) / name
    if not folder.is_dir():
        return False
    with _locked(folder):
        # the name of a save's temporary folder: a killed process's leftover is cleaned up
        gone = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
        try:
            os.replace(folder, gone)  # atomically out of sight, then deleted
        except OSError as err:
            raise _write_error(err, folder) from err
        shutil.rmtree(gone, ignore_errors=True)
    return True
