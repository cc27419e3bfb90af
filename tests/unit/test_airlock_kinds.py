"""File kinds are decided from content, never from names; refused content is named."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import zipfile

import pandas as pd
import pytest

from spe.airlock.kinds import sniff


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data.csv", "a,b\n1,2\n")
    return buf.getvalue()


def _parquet() -> bytes:
    buf = io.BytesIO()
    pd.DataFrame({"a": [1, 2], "n": [10, 20]}).to_parquet(buf)
    return buf.getvalue()


def _notebook(outputs: bool) -> bytes:
    cell = {"cell_type": "code", "source": "1+1", "metadata": {}, "execution_count": None,
            "outputs": [{"output_type": "stream", "text": "2"}] if outputs else []}
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {},
                       "cells": [cell]}).encode()


@pytest.mark.parametrize(("data", "kind", "refused"), [
    (b"sex,n\nF,120\nM,130\n", "csv", False),
    (b"sex\tn\nF\t120\nM\t130\n", "tsv", False),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "png", False),
    (b"%PDF-1.7\n...", "pdf", False),
    (b"just some words\n", "txt", False),
    (b'{"coef": [0.1, 0.2]}', "json", False),
    (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "svg", False),
    (b"\x7fELF\x02\x01\x01" + b"\x00" * 20, "elf", True),
    (b"MZ\x90\x00" + b"\x00" * 20, "windows", True),
    (b"#!/bin/sh\nrm -rf /\n", "script", True),
    (gzip.compress(b"a,b\n1,2\n"), "gzip", True),
    (pickle.dumps({"weights": [1, 2, 3]}), "python", True),
    (b"\x93NUMPY\x01\x00", "numpy", True),
    (bytes(range(256)) * 4, "unknown", False),
])
def test_sniff(data: bytes, kind: str, refused: bool) -> None:
    got = sniff(data)
    assert got.kind == kind
    assert bool(got.refused) is refused


def test_zip_and_pytorch_checkpoints_are_archives() -> None:
    assert sniff(_zip()).refused
    # torch.save writes a zip whose data.pkl is a pickle: refused as an archive either way.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    assert "zip" in (sniff(buf.getvalue()).refused or "")


def test_parquet_is_parsed_not_guessed() -> None:
    assert sniff(_parquet()).kind == "parquet"
    assert sniff(b"PAR1 not really PAR1").kind == "unknown"


def test_notebooks_with_outputs_are_refused() -> None:
    assert sniff(_notebook(outputs=True)).refused
    clean = sniff(_notebook(outputs=False))
    assert clean.kind == "notebook" and clean.refused is None


def test_safetensors() -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    data = len(header).to_bytes(8, "little") + header + b"\x00\x00\x80\x3f"
    assert sniff(data).kind == "safetensors"
