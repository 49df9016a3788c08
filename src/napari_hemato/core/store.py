"""The on-disk result store of a run (a zarr v3 group).

Layout of ``RESULT.zarr``::

    zarr.json            group; attrs["napari_hemato"] = run config + status
    labels/0             uint32 instance labels on the work grid, chunk = tile core
    labels/1, 2, ...     every second pixel of the level above (core.label_pyramid), built
                         when the run completes; updated by saved mask edits
    labels/zarr.json     OME-NGFF style multiscales (axes y, x in µm)
    tiles/000042.npz     one file per finished tile: label fragment + object rows
    tissue.npz           the run's tissue mask, if it had one (tiles off it are not read)
    assembled/000042     marker: the labels chunk of tile 42 is final
    objects.csv          the per-object table, written when the run completes
    edits/000001.npz     mask corrections saved into labels/0 (core.store_edits)

A tile file is written under a temporary name and renamed, so its presence is
the tile's "done" marker: a killed process loses at most the tiles in flight,
and a resumed run skips every tile that has a file. The store itself is built
under a temporary name and renamed into place, so it exists whole or not at all.

A resume first checks the store (:meth:`ResultStore.verify`): a tile file that
does not open as a complete archive is removed (the tile is redone; damage inside
an archive member fails its CRC when read, a StoreError naming the file), and an
``assembled/`` marker records the SHA-256 of its labels chunk file (or that the
chunk is all background), so a deleted, truncated or altered chunk loses its
marker and is assembled again. Temporary files left by a killed process are
removed. A write that fails (disk full, read-only folder) raises
:class:`~napari_hemato.core.errors.WriteError` naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from napari_hemato.core.errors import StoreError, WriteError
from napari_hemato.core.objects import TileOutput
from napari_hemato.core.processes import pid_alive
from napari_hemato.core.table import read_table_csv

log = logging.getLogger(__name__)

FORMAT = "napari-hemato-result/1"
_KEY = "napari_hemato"
# config keys that must match for a run to resume into an existing store
RESUME_KEYS = ("format", "slide", "model", "grid", "plan", "id_stride", "tissue")


class ResultStore:
    """Read and write a run's result store. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group

    # -- creation / opening ---------------------------------------------------
    @classmethod
    def create(cls, path, config: dict, *, overwrite: bool = False,
               files: dict[str, bytes] | None = None) -> ResultStore:
        """A new store for ``config`` (which must hold ``plan`` and ``grid``), with ``files``
        (name -> bytes, e.g. the tissue mask) written inside it.

        The store is built in a temporary folder beside ``path`` and renamed into
        place: a process killed meanwhile leaves no half-made store at ``path``.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise StoreError(
                f"{path}: already exists; pass resume to continue that run or overwrite to replace it"
            )
        if path.exists() and not _is_store(path):
            raise StoreError(f"{path}: exists and is not a napari-hemato result; not overwriting it")
        with _writing(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temps(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with _writing(tmp):
                _build(tmp, config)
                for name, data in (files or {}).items():
                    (tmp / name).write_bytes(data)
                if path.exists():  # overwrite: move the old store aside, then delete it
                    aside = path.with_name(f".{path.name}.{os.getpid()}.old")
                    os.replace(path, aside)
                    os.replace(tmp, path)
                    shutil.rmtree(aside, ignore_errors=True)
                else:
                    os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path) -> ResultStore:
        """Open an existing store (to resume it or read its results)."""
        path = Path(path)
        if not _is_store(path):
            raise StoreError(f"{path}: not a napari-hemato result store")
        try:
            group = zarr.open_group(str(path), mode="r+")
        except (OSError, ValueError) as err:
            raise StoreError(f"{path}: cannot open result store ({err})") from None
        for sub in ("tiles", "assembled"):
            if not (path / sub).is_dir():
                raise StoreError(f"{path}: not a complete result store ({sub}/ is missing)")
        store = cls(path, group)
        if (path / "edits").is_dir():
            from napari_hemato.core.store_edits import replay_pending

            replay_pending(store)  # a mask edit a killed process left half-written
        return store

    def verify(self) -> tuple[list[int], list[int]]:
        """Check the store before a resume; returns the (tiles, chunks) to redo.

        Removes temporary files a killed process left, tile files that do not
        open as a complete archive, and ``assembled/`` markers whose labels chunk
        is missing or differs from the one written.
        """
        for pattern in ("tiles/.*.tmp", "edits/.*.tmp", ".objects.*.tmp", "**/*.partial"):
            for leftover in self.path.glob(pattern):
                leftover.unlink(missing_ok=True)
        bad_tiles = [int(p.stem) for p in sorted((self.path / "tiles").glob("*.npz"))
                     if not _tile_file_ok(p)]
        for index in bad_tiles:
            log.warning("%s: damaged, the tile is redone", self._tile_path(index))
            self._tile_path(index).unlink(missing_ok=True)
        bad_chunks = []
        if self.labels is not None:
            for marker in sorted((self.path / "assembled").iterdir()):
                if marker.name.isdigit() and self._chunk_ok(marker):
                    continue
                if marker.name.isdigit():
                    bad_chunks.append(int(marker.name))
                    log.warning("%s: labels chunk damaged or missing, assembled again", marker)
                marker.unlink(missing_ok=True)
        return bad_tiles, bad_chunks

    @property
    def config(self) -> dict:
        return dict(self.group.attrs[_KEY])

    def check_resumable(self, config: dict) -> None:
        """Raise StoreError unless ``config`` describes the same run."""
        mine = _jsonable(self.config)
        theirs = _jsonable({"format": FORMAT, **config})
        if isinstance(mine.get("model"), dict):  # runs from before int8 networks ran float
            mine["model"].setdefault("weights", "float")
        diff = [k for k in RESUME_KEYS if mine.get(k) != theirs.get(k)]
        if diff:
            raise StoreError(
                f"{self.path}: cannot resume, the run differs in {', '.join(diff)} "
                "(same slide, model, region, tile, pixel size and tissue mask are needed)"
            )

    def tissue(self):
        """The run's :class:`~napari_hemato.core.tissue.TissueMask` (None: it had none)."""
        if not self.config.get("tissue"):
            return None
        from napari_hemato.core.tissue_io import MASK_FILE, read_mask

        return read_mask(self.path / MASK_FILE)

    @property
    def status(self) -> str:
        return self.config.get("status", "unknown")

    def set_status(self, status: str, **extra) -> None:
        config = self.config
        config.update(status=status, **extra)
        with _writing(self.path / "zarr.json"):
            self.group.attrs[_KEY] = _jsonable(config)

    # -- tiles --------------------------------------------------------------
    def _tile_path(self, index: int) -> Path:
        return self.path / "tiles" / f"{index:06d}.npz"

    def done_tiles(self) -> set[int]:
        return {int(p.stem) for p in (self.path / "tiles").glob("*.npz") if p.stem.isdigit()}

    def write_tile(self, out: TileOutput) -> None:
        """Atomically write one tile's fragment and rows."""
        arrays = {f"col_{k}": v for k, v in out.columns.items()}
        arrays["box"] = np.asarray(out.box, np.int64)
        if out.fragment is not None:
            arrays["fragment"] = out.fragment
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        _atomic_write(self._tile_path(out.index), buf.getvalue())

    def read_tile(self, index: int) -> TileOutput:
        try:
            with np.load(self._tile_path(index), allow_pickle=False) as data:
                columns = {k[4:]: data[k] for k in data.files if k.startswith("col_")}
                fragment = data["fragment"] if "fragment" in data.files else None
                box = tuple(int(v) for v in data["box"])
        except (OSError, ValueError, KeyError) as err:
            raise StoreError(f"{self._tile_path(index)}: unreadable tile file ({err})") from None
        return TileOutput(index, box, fragment, columns)

    # -- labels assembly ----------------------------------------------------
    @property
    def labels(self) -> zarr.Array | None:
        return self.group["labels/0"] if "labels" in self.group else None

    def assembled(self) -> set[int]:
        return {int(p.name) for p in (self.path / "assembled").iterdir() if p.name.isdigit()}

    def _chunk_file(self, box) -> Path:
        labels = self.labels
        key = labels.metadata.encode_chunk_key((box[0] // labels.chunks[0], box[1] // labels.chunks[1]))
        return self.path / "labels" / "0" / key

    def _chunk_ok(self, marker: Path) -> bool:
        try:
            recorded = json.loads(marker.read_text() or "{}")
        except (OSError, ValueError):
            return False
        if "sha256" not in recorded or "box" not in recorded:
            return False
        return _digest(self._chunk_file(recorded["box"])) == recorded["sha256"]

    def write_chunk(self, index: int, box, data: np.ndarray) -> None:
        """Write the final labels of one chunk, then its marker (with the chunk's digest)."""
        y0, x0, y1, x1 = box
        chunk = self._chunk_file(box)
        with _writing(chunk):
            self.labels[y0:y1, x0:x1] = data
        record = json.dumps({"box": [int(v) for v in box], "sha256": _digest(chunk)})
        _atomic_write(self.path / "assembled" / f"{index:06d}", record.encode())

    # -- table ----------------------------------------------------------------
    def write_table(self, frames, columns: list[str]) -> int:
        """Stream DataFrames into ``objects.csv`` (atomically); returns the row count."""
        target = self.path / "objects.csv"
        n = 0
        with _writing(target):
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".objects.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", newline="") as fh:
                    pd.DataFrame(columns=columns).to_csv(fh, index=False)
                    for frame in frames:
                        frame.to_csv(fh, index=False, header=False, columns=columns)
                        n += len(frame)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return n

    def table(self) -> pd.DataFrame:
        path = self.path / "objects.csv"
        if not path.exists():
            raise StoreError(f"{self.path}: no object table yet (status: {self.status})")
        return read_table_csv(path)


def _is_store(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError):
        return False
    return attrs.get(_KEY, {}).get("format") == FORMAT


class _writing:
    """Turn an OSError raised while writing ``path`` into a one-line :class:`WriteError`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if err is not None and isinstance(err, OSError) and not isinstance(err, WriteError):
            where = err.filename or self.path
            raise WriteError(f"{where}: cannot write ({err.strerror or err})",
                             err.errno or errno.EIO) from err
        return False


def _atomic_write(path: Path, data: bytes) -> None:
    with _writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _build(path: Path, config: dict) -> None:
    group = zarr.open_group(str(path), mode="w-")
    config = {"format": FORMAT, **config, "status": "running"}
    group.attrs[_KEY] = _jsonable(config)
    if config.get("kind") == "instances":
        plan = config["plan"]
        labels = group.create_group("labels")
        labels.create_array(
            "0", shape=tuple(plan["shape"]), chunks=(plan["tile"], plan["tile"]),
            dtype="uint32", fill_value=0,
        )
        scale, translate = config["placement"]
        labels.attrs["multiscales"] = [{
            "version": "0.5-dev", "name": "labels",
            "axes": [{"name": "y", "type": "space", "unit": config["unit"]},
                     {"name": "x", "type": "space", "unit": config["unit"]}],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": list(scale)},
                {"type": "translation", "translation": list(translate)}]}],
        }]
    (path / "tiles").mkdir()
    (path / "assembled").mkdir()


def _remove_dead_temps(path: Path) -> None:
    """Remove ``.NAME.<pid>.creating/.old`` folders of processes that no longer run."""
    for tmp in path.parent.glob(f".{path.name}.*"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if len(parts) == 2 and parts[0].isdigit() and parts[1] in ("creating", "old") \
                and not pid_alive(int(parts[0])):
            shutil.rmtree(tmp, ignore_errors=True)



def _tile_file_ok(path: Path) -> bool:
    """A tile file is whole: its archive's directory (at the end) reads, it has a box, and
    every member lies inside the file. Cheap (no decompression): a truncated file always
    fails; damage inside a member is caught by its CRC when the tile is read."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            return any(i.filename == "box.npy" for i in infos) and all(
                i.header_offset + i.compress_size <= size for i in infos)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def _digest(path: Path) -> str | None:
    """SHA-256 of a file, None when it does not exist (an all-background chunk)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=_default))


def _default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
