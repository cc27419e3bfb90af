"""File kind from content, never from the name.

Contract: :func:`sniff` looks at a file's bytes (magic numbers, then a real parse) and returns
a :class:`Sniffed` with the ``kind`` and, for refused content, ``refused`` set to why. Archives
(zip, gzip, bzip2, xz, 7z, rar, tar), executables (ELF, PE, Mach-O, scripts with ``#!``),
pickles (and PyTorch checkpoints, NumPy arrays) and notebooks with outputs are refused whatever
their name. A zip that is an XLSX workbook (``spe.airlock.xlsx``) is a table when it holds
plain cells only, refused when it carries macros, external links or embedded objects.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import pyarrow.parquet as pq

#: Kinds the airlock can name (a superset of ``permits.schemas.FileKind``).
TABLE_KINDS = frozenset({"csv", "tsv", "parquet", "xlsx"})
REVIEW_KINDS = frozenset({"png", "jpeg", "gif", "pdf", "svg", "txt", "md", "json", "notebook",
                          "onnx",
                          "safetensors", "unknown"})

_ARCHIVES = (
    (b"PK\x03\x04", "zip archive"), (b"PK\x05\x06", "zip archive"), (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"7z\xbc\xaf\x27\x1c", "7z archive"),
    (b"Rar!\x1a\x07", "rar archive"), (b"\x28\xb5\x2f\xfd", "zstd"),
)
_EXECUTABLES = (
    (b"\x7fELF", "ELF executable"), (b"MZ", "Windows executable"),
    (b"\xcf\xfa\xed\xfe", "Mach-O executable"), (b"\xce\xfa\xed\xfe", "Mach-O executable"),
    (b"\xca\xfe\xba\xbe", "Mach-O or Java class"), (b"#!", "script"),
    (b"\x00asm", "WebAssembly"),
)
_IMAGES = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"),
           (b"GIF89a", "gif"), (b"%PDF-", "pdf"))


#: Bytes of a text file that decide its kind (the table parser then reads them all).
SAMPLE = 65536


@dataclass(frozen=True)
class Sniffed:
    kind: str
    refused: str | None = None


def dangerous(data: bytes) -> str | None:
    """What refused content ``data`` starts with (archive, executable, pickle), or None."""
    for magic, name in _ARCHIVES + _EXECUTABLES:
        if data.startswith(magic):
            return name
    if len(data) >= 262 and data[257:262] == b"ustar":
        return "tar archive"
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "Python pickle"
    if data[:2] in (b"(d", b"(l", b"(i", b"}q", b"]q", b"cc", b"cb") and \
            data.rstrip().endswith(b"."):
        return "Python pickle (protocol 0/1)"
    if data.startswith(b"\x93NUMPY"):
        return "NumPy array (may hold pickled objects)"
    return None


def _safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or size > min(len(data) - 8, 100_000_000):
        return False
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(header, dict)


def _delimited(text: str) -> str | None:
    """'csv' or 'tsv' when ``text`` parses as a table of at least two columns and one data
    row with the same number of fields on every line; None otherwise."""
    if len(text) > SAMPLE:  # a sample decides the dialect; the table parse reads it all
        text = text[:SAMPLE].rsplit("\n", 1)[0]
    if len(text.splitlines()) < 2:
        return None
    for delimiter, kind in ((",", "csv"), ("\t", "tsv")):
        try:
            rows = list(csv.reader(io.StringIO(text), delimiter=delimiter, strict=True))
        except csv.Error:
            continue
        rows = [r for r in rows if r]
        if len(rows) >= 2 and len(rows[0]) >= 2 and all(len(r) == len(rows[0]) for r in rows):
            return kind
    return None


def _notebook(doc: object) -> Sniffed | None:
    if not (isinstance(doc, dict) and "cells" in doc and "nbformat" in doc):
        return None
    cells = doc.get("cells")
    if not isinstance(cells, list):
        return Sniffed("notebook", "a notebook whose cells cannot be read")
    for cell in cells:
        if isinstance(cell, dict) and (cell.get("outputs") or cell.get("attachments")):
            return Sniffed("notebook", "a notebook with outputs: clear all outputs "
                           "(Edit > Clear Outputs of All Cells), save and upload it again")
    return Sniffed("notebook")


def sniff(data: bytes) -> Sniffed:
    """The kind of ``data`` from its content (see the module docstring)."""
    if data.startswith(b"PK\x03\x04"):
        from spe.airlock import xlsx  # it imports this module

        book = xlsx.inspect(data)
        if book is not None:
            return Sniffed("xlsx", book.refused)
    bad = dangerous(data)
    if bad is not None:
        return Sniffed(bad.split(" ")[0].lower(), f"{bad} content is never exported")
    from spe.airlock import models_check  # it imports this module through checks

    model = models_check.refused_model(data)
    if model is not None:
        return Sniffed("model", f"{model}: models leave only as safetensors, ONNX or JSON "
                       "coefficients")
    for magic, kind in _IMAGES:
        if data.startswith(magic):
            return Sniffed(kind)
    if data.startswith(b"PAR1") and data.endswith(b"PAR1"):
        try:
            pq.ParquetFile(io.BytesIO(data)).schema_arrow  # noqa: B018 - a real parse
        except Exception:  # noqa: BLE001 - any parse failure means not Parquet
            return Sniffed("unknown")
        return Sniffed("parquet")
    if _safetensors(data):
        return Sniffed("safetensors")
    if models_check.is_onnx(data):  # a protobuf; stops at the first byte of text
        return Sniffed("onnx")
    if b"\x00" in data:
        return Sniffed("unknown")
    text = _head_text(data)
    if text is None:
        return Sniffed("unknown")
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith(("{", "[")):
        try:
            doc = json.loads(data.decode("utf-8").lstrip("\ufeff \t\r\n"))
        except ValueError:
            doc = None
        if doc is not None:
            return _notebook(doc) or Sniffed("json")
    head = stripped[:512].lower()
    if head.startswith("<svg") or (head.startswith("<?xml") and "<svg" in head):
        return Sniffed("svg")
    if head.startswith(("<!doctype html", "<html")):
        return Sniffed("unknown")
    table = _delimited(text)
    if table is not None:
        return Sniffed(table)  # the table parser reads (and validates) every byte
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return Sniffed("unknown")
    return Sniffed("txt")


def _head_text(data: bytes) -> str | None:
    """The first ``SAMPLE`` bytes as text, ending at a line end when the file is longer;
    None when they are not UTF-8."""
    head = data[:SAMPLE]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if len(data) <= SAMPLE or err.start < SAMPLE - 3:
            return None
        text = head[:err.start].decode("utf-8")  # a character cut by the sample's end
    if len(data) > SAMPLE:
        text = text.rsplit("\n", 1)[0]
    return text
