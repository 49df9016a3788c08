"""The object-table CSV reader shared by sidecars, exports and the CLI."""

import numpy as np
import pandas as pd

from napari_hemato.core.table import read_table_csv


def test_read_table_csv_keeps_strings_exact_floats_and_types(tmp_path):
    """One reader for every table: class names never become numbers or NaN."""
    table = pd.DataFrame({
        "id": np.array([1, 2, 3], dtype=np.int64),
        "y": [0.1 + 0.2, 1 / 3, 2.0 ** -30],
        "class": ["NA", "1", "LY"],
        "provenance": ["auto", "corrected", "manual"],
        "reviewed": [True, False, True],
        "bbox_y0": np.array([0, 5, 9], dtype=np.int64),
    })
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    back = read_table_csv(path)
    assert list(back["class"]) == ["NA", "1", "LY"]
    assert back["y"].tolist() == table["y"].tolist()  # bit for bit
    assert back["reviewed"].dtype == bool and back["reviewed"].tolist() == [True, False, True]
    assert back["id"].dtype == np.int64 and back["bbox_y0"].dtype == np.int64
