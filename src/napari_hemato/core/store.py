"""The on-disk result store of a run (a zarr v3 group).

Layout of ``RESULT.zarr``::

    zarr.json            group; attrs["napari_hemato"] = run config + status
    labels/0             uint32 instance labels on the work grid, chunk = tile core
    labels/zarr.json     OME-NGFF style multiscales (axes y, x in µm)
    tiles/000042.npz     one file per finished tile: label fragment + object rows
    assembled/000042     marker: the labels chunk of tile 42 is final
    objects.csv          the per-object table, written when the run completes

A tile file is written under a temporary name and renamed, so its presence is
the tile's "done" marker: a killed process loses at most the tiles in flight,
and a resumed run skips every tile that has a file.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from napari_hemato.core.errors import StoreError
from napari_hemato.core.objects import TileOutput
from napari_hemato.core.table import read_table_csv

log = logging.getLogger(__name__)

FORMAT = "napari-hemato-result/1"
_KEY = "napari_hemato"
# config keys that must match for a run to resume into an existing store
RESUME_KEYS = ("format", "slide", "model", "grid", "plan", "id_stride")


class ResultStore:
    """Read and write a run's result store. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group

    # -- creation / opening ---------------------------------------------------
    @classmethod
    def create(cls, path, config: dict, *, overwrite: bool = False) -> ResultStore:
        """A new store for ``config`` (which must hold ``plan`` and ``grid``)."""
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise StoreError(
                    f"{path}: already exists; pass resume to continue that run or overwrite to replace it"
                )
            if not _is_store(path):
                raise StoreError(f"{path}: exists and is not a napari-hemato result; not overwriting it")
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
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
        return cls(path, group)

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
        return cls(path, group)

    @property
    def config(self) -> dict:
        return dict(self.group.attrs[_KEY])

    def check_resumable(self, config: dict) -> None:
        """Raise StoreError unless ``config`` describes the same run."""
        mine = _jsonable(self.config)
        theirs = _jsonable({"format": FORMAT, **config})
        diff = [k for k in RESUME_KEYS if mine.get(k) != theirs.get(k)]
        if diff:
            raise StoreError(
                f"{self.path}: cannot resume, the run differs in {', '.join(diff)} "
                "(same slide, model, region, tile and pixel size are needed)"
            )

    @property
    def status(self) -> str:
        return self.config.get("status", "unknown")

    def set_status(self, status: str, **extra) -> None:
        config = self.config
        config.update(status=status, **extra)
        self.group.attrs[_KEY] = _jsonable(config)

    # -- tiles --------------------------------------------------------------
    def _tile_path(self, index: int) -> Path:
        return self.path / "tiles" / f"{index:06d}.npz"

    def done_tiles(self) -> set[int]:
        return {int(p.stem) for p in (self.path / "tiles").glob("*.npz")}

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
        return {int(p.name) for p in (self.path / "assembled").iterdir()}

    def write_chunk(self, index: int, box, data: np.ndarray) -> None:
        y0, x0, y1, x1 = box
        self.labels[y0:y1, x0:x1] = data
        (self.path / "assembled" / f"{index:06d}").touch()

    # -- table ----------------------------------------------------------------
    def write_table(self, frames, columns: list[str]) -> int:
        """Stream DataFrames into ``objects.csv`` (atomically); returns the row count."""
        target = self.path / "objects.csv"
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".objects.", suffix=".tmp")
        n = 0
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


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
