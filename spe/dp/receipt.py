"""Signed release receipts for DP outputs, recognised by the airlock.

Contract: :func:`output_bytes` serialises a released table to the exact CSV and Parquet bytes
the researcher receives. :func:`sign` returns a receipt holding the SHA-256 of both, the
permit, the charge and the cost, signed with HMAC-SHA256 under the server's ``secret_key``.
:func:`verify` checks the signature and, given a file's bytes, that the file is one of the two
released serialisations (byte for byte). A receipt is valid only for the SPE that signed it.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

RECEIPT_VERSION = 1
SIGNED_FIELDS = ("version", "permit_id", "charge_id", "dataset", "sha256_csv",
                 "sha256_parquet", "epsilon", "delta", "issued_at", "rows", "columns")


def output_bytes(table: pd.DataFrame) -> tuple[bytes, bytes]:
    """(CSV bytes, Parquet bytes) of ``table``; deterministic for a given library version."""
    csv = table.to_csv(index=False, lineterminator="\n").encode()
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), buf,
                   compression="snappy")
    return csv, buf.getvalue()


def _canonical(receipt: dict[str, Any]) -> bytes:
    body = {k: receipt.get(k) for k in SIGNED_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign(secret: str, *, permit_id: str, charge_id: str, dataset: str, csv: bytes,
         parquet: bytes, epsilon: float, delta: float, issued_at: str, rows: int,
         columns: list[str]) -> dict[str, Any]:
    receipt: dict[str, Any] = {
        "version": RECEIPT_VERSION, "permit_id": permit_id, "charge_id": charge_id,
        "dataset": dataset, "sha256_csv": hashlib.sha256(csv).hexdigest(),
        "sha256_parquet": hashlib.sha256(parquet).hexdigest(), "epsilon": epsilon,
        "delta": delta, "issued_at": issued_at, "rows": rows, "columns": columns,
        "algorithm": "HMAC-SHA256",
    }
    receipt["signature"] = hmac.new(secret.encode(), _canonical(receipt),
                                    hashlib.sha256).hexdigest()
    return receipt


def verify(receipt: dict[str, Any], secret: str, data: bytes | None = None) -> bool:
    """True when ``receipt`` was signed with ``secret`` (and ``data`` is a released file)."""
    if not isinstance(receipt, dict) or receipt.get("algorithm") != "HMAC-SHA256":
        return False
    signature = receipt.get("signature")
    if not isinstance(signature, str):
        return False
    expected = hmac.new(secret.encode(), _canonical(receipt), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature, expected):
        return False
    if data is None:
        return True
    digest = hashlib.sha256(data).hexdigest()
    return digest in (receipt.get("sha256_csv"), receipt.get("sha256_parquet"))
