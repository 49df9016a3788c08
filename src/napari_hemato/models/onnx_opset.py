"""The default-domain opset of an ONNX file, read from its protobuf without the onnx package.

A ~30-line reader of the few protobuf fields needed (``ModelProto.opset_import``), so
that writing a bioimage.io package needs no ``onnx`` at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

from napari_hemato.core.errors import ModelError


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message (values: int or bytes)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
        yield number, wire, value


def onnx_opset(path: str | os.PathLike) -> int:
    """The default-domain opset an ONNX file imports (``ModelProto.opset_import``).

    Examples
    --------
    >>> from napari_hemato.models.registry import bundled_model_dir  # doctest: +SKIP
    >>> onnx_opset(bundled_model_dir("nuclei") / "model.onnx")  # doctest: +SKIP
    17
    """
    buf = Path(path).read_bytes()
    try:
        for number, wire, value in _fields(buf):
            if number == 8 and wire == 2:  # OperatorSetIdProto {1: domain, 2: version}
                parts = {n: v for n, _, v in _fields(value)}
                if parts.get(1, b"") in (b"", b"ai.onnx"):
                    return int(parts.get(2, 1))
    except ValueError as exc:
        raise ModelError(f"{path}: not a readable ONNX file ({exc})") from None
    raise ModelError(f"{path}: the ONNX file imports no default-domain opset")


# -- the package -------------------------------------------------------------------------------
