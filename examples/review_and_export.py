"""Correct results without a viewer and export them as training data.

The same ReviewSession the napari Review widget uses: change a class, delete an
object, then write crops + manifest (what ``napari-hemato train`` reads) and a
QuPath GeoJSON.

Run:  python examples/review_and_export.py --out exports/
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import napari_hemato.api as nh
from napari_hemato.core.annotations import from_result
from napari_hemato.core.export.formats import export_annotations
from napari_hemato.core.review import ReviewSession
from napari_hemato.samples import sample_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()))
    args = parser.parse_args()

    result = nh.analyze(sample_path("he_slide"), task="nuclei",
                        out=args.out / "run.zarr", roi=(1500, 850, 2012, 1362), overwrite=True)
    session = ReviewSession(from_result(result))
    queue = session.build_queue(mode="uncertain")  # least certain first
    print(f"{len(queue)} objects to review; the least certain is id {queue[0]}")
    session.mark_reviewed(queue[:5])
    session.delete([queue[-1]])
    written = export_annotations(session.to_annotations(), args.out, ["crops", "geojson"],
                                 name="he_sample", overwrite=True)
    for fmt, path in written.items():
        print(f"{fmt}: {path}")


if __name__ == "__main__":
    main()
