"""Trained models leaving the airlock: safe formats only, structural checks at once.

Contract
--------
* Accepted for review (never released automatically): safetensors, ONNX and plain JSON
  coefficients. Pickles (whatever the name: ``.pt``, ``.pth``, ``.joblib``, ``.pkl``), zip
  archives (PyTorch's own format, Keras, ``.npz``) and NumPy arrays are refused by
  :mod:`spe.airlock.kinds`; :func:`refused_model` names the other model containers refused
  here (HDF5/Keras ``.h5``, GGUF, TensorFlow Lite, zlib streams as joblib writes them).
* :func:`structural_checks` runs at once, in the spirit of SACRO-ML's structural attacks:

  - the container parses: a safetensors header read as JSON without loading any tensor,
    offsets inside the file, contiguous and covering it; an ONNX protobuf walked field by
    field (no ``onnx`` package needed), no external data (files outside the model);
  - parameters against the training rows the researcher declared (``training_rows`` in a
    ``{"evidence": "model", "file": ..., "training_rows": N}`` entry of the request's
    ``receipts``): a model with fewer than 10 residual degrees of freedom (ACRO's rule for
    regressions, :func:`spe.airlock.sdc.residual_dof_too_small`) can memorise its rows;
    no declaration goes to review;
  - tensors that look like embedded data rather than weights: integer or boolean tensors,
    byte tensors of printable text, float tensors whose values are all whole numbers in a
    small range (codes, ages, counts copied into a "weight"), string tensors (ONNX);
    free-text metadata longer than :data:`MAX_METADATA` characters.

  Failures go to the reviewers (who override only with a written reason); an unparseable
  container is blocking.
* The membership-inference attack needs PyTorch/XGBoost and SACRO-ML: it runs as a
  background job in its own environment (:mod:`spe.airlock.mia_job`), never here.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spe.airlock.checks import FAIL, PASS, REVIEW, Check
from spe.airlock.sdc import residual_dof_too_small

MODEL_KINDS = frozenset({"safetensors", "onnx", "json_model"})
#: Longest free-text metadata value accepted without a failure.
MAX_METADATA = 1024
#: Elements of one tensor decoded for the value checks (a bound on time, not on safety:
#: larger tensors are checked on their first elements).
MAX_DECODED = 200_000
#: Tensors smaller than this are not judged by their values (a few small integers are normal).
MIN_SUSPECT = 32
#: A float tensor of whole numbers spanning at most this range looks like copied values.
INTEGRAL_RANGE = 10_000

_REFUSED_MAGIC = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5 models can hold Python code)"),
    (b"GGUF", "a GGUF model"),
)
_ZLIB = (b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda")
_COEF_KEYS = frozenset({"coef", "coef_", "coefs", "coefficients", "intercept", "intercept_",
                        "weights", "beta", "betas", "params", "parameters"})


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # "float", "int", "bool", "bytes" or "string"
    count: int
    values: Sequence[float] | bytes | None = None  # decoded sample, when decoded


class Malformed(ValueError):
    """The container does not parse; the message says what (never echoes content)."""


def refused_model(data: bytes) -> str | None:
    """The refused model container ``data`` is, or None."""
    for magic, what in _REFUSED_MAGIC:
        if data.startswith(magic):
            return what
    if len(data) >= 8 and data[4:8] == b"TFL3":
        return "a TensorFlow Lite model"
    if data[:2] in _ZLIB:
        try:
            data[:4096].decode("utf-8")
        except UnicodeDecodeError:
            return "a zlib stream (joblib's compressed pickles)"
    return None


def model_kind(kind: str, data: bytes) -> str | None:
    """The model kind of a sniffed file (``json_model`` for JSON naming coefficients)."""
    if kind in ("safetensors", "onnx"):
        return kind
    if kind == "json" and json_model(data) is not None:
        return "json_model"
    return None


def declared_rows(receipts: Sequence[Mapping[str, Any]]) -> dict[str, int | None]:
    """{file name: training rows} from the request's ``evidence: model`` entries."""
    out: dict[str, int | None] = {}
    for entry in receipts:
        if isinstance(entry, Mapping) and entry.get("evidence") == "model" \
                and isinstance(entry.get("file"), str):
            rows = entry.get("training_rows")
            ok = isinstance(rows, int) and not isinstance(rows, bool) and rows > 0
            out[entry["file"]] = rows if ok else None
    return out


# -- safetensors --------------------------------------------------------------------------

_ST_DTYPES = {"F64": ("float", 8, "d"), "F32": ("float", 4, "f"), "F16": ("float", 2, "e"),
              "BF16": ("float", 2, None), "F8_E5M2": ("float", 1, None),
              "F8_E4M3": ("float", 1, None), "I64": ("int", 8, "q"), "I32": ("int", 4, "i"),
              "I16": ("int", 2, "h"), "I8": ("int", 1, "b"), "U64": ("int", 8, "Q"),
              "U32": ("int", 4, "I"), "U16": ("int", 2, "H"), "U8": ("bytes", 1, "B"),
              "BOOL": ("bool", 1, "?")}


def safetensors_tensors(data: bytes) -> tuple[list[Tensor], dict[str, str]]:
    """The tensors (with a decoded sample) and metadata of a safetensors file."""
    if len(data) < 8:
        raise Malformed("shorter than the 8-byte header length")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8 or size > 100_000_000:
        raise Malformed("a header longer than the file")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, ValueError):
        raise Malformed("a header that is not JSON") from None
    if not isinstance(header, dict):
        raise Malformed("a header that is not a JSON object")
    buffer = memoryview(data)[8 + size:]
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise Malformed("__metadata__ that is not a map of strings")
    spans: list[tuple[int, int]] = []
    tensors: list[Tensor] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise Malformed("a tensor entry that is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _ST_DTYPES or not isinstance(shape, list) or not all(
                isinstance(d, int) and d >= 0 for d in shape) or not (
                isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise Malformed("a tensor entry without a known dtype, shape and data_offsets")
        kind, width, fmt = _ST_DTYPES[dtype]
        count = math.prod(shape)
        begin, end = offsets
        if not 0 <= begin <= end <= len(buffer) or end - begin != count * width:
            raise Malformed("tensor offsets outside the file or not matching the shape")
        spans.append((begin, end))
        n = min(count, MAX_DECODED)
        raw = bytes(buffer[begin:begin + n * width])
        values: Sequence[float] | bytes | None
        if kind == "bytes":
            values = raw
        elif fmt is not None:
            values = struct.unpack(f"<{n}{fmt}", raw)
        elif dtype == "BF16":
            values = [struct.unpack("<f", b"\x00\x00" + raw[i:i + 2])[0]
                      for i in range(0, len(raw), 2)]
        else:
            values = None
        tensors.append(Tensor(str(name), kind, count, values))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise Malformed("tensor data that overlap or leave gaps (hidden bytes)")
        position = end
    if position != len(buffer):
        raise Malformed("bytes after the last tensor (hidden data)")
    return tensors, {str(k): v for k, v in meta.items()}


# -- ONNX (protobuf, walked by hand) ------------------------------------------------------

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise Malformed("a truncated protobuf varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one protobuf message; raises Malformed."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise Malformed("a protobuf field number 0")
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, wire, value
        elif wire == 1:
            if pos + 8 > len(data):
                raise Malformed("a truncated protobuf field")
            yield number, wire, data[pos:pos + 8]
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise Malformed("a truncated protobuf field")
            yield number, wire, data[pos:pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > len(data):
                raise Malformed("a truncated protobuf field")
            yield number, wire, data[pos:pos + 4]
            pos += 4
        else:
            raise Malformed("a protobuf wire type ONNX does not use")


# ModelProto fields (onnx.proto3): 1 ir_version, 2 producer_name, 3 producer_version,
# 4 domain, 5 model_version, 6 doc_string, 7 graph, 8 opset_import, 14 metadata_props,
# 20 training_info, 25 functions, 26 configuration.
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
# TensorProto.DataType
_ONNX_FLOAT = {1: ("f", 4), 10: ("e", 2), 11: ("d", 8), 16: (None, 2)}
_ONNX_INT = {2, 3, 4, 5, 6, 7, 12, 13}
_ONNX_STRING, _ONNX_BOOL = 8, 9


def is_onnx(data: bytes) -> bool:
    """Whether ``data`` parses as an ONNX ModelProto with an IR version and a graph."""
    try:
        seen = {}
        for number, wire, value in _fields(data):
            if _MODEL_FIELDS.get(number) != wire:
                return False
            seen[number] = value
        version = seen.get(1)
        return isinstance(version, int) and 1 <= version <= 100 and 7 in seen
    except Malformed:
        return False


def _tensor(raw: bytes) -> tuple[Tensor, bool]:
    """One TensorProto and whether its data live outside the file."""
    dims: list[int] = []
    dtype = 0
    name = ""
    payload = b""
    floats: list[float] = []
    external = False
    for number, _wire, value in _fields(raw):
        if number == 1:  # dims, packed or not
            if isinstance(value, int):
                dims.append(value)
            else:
                pos = 0
                while pos < len(value):
                    d, pos = _varint(value, pos)
                    dims.append(d)
        elif number == 2 and isinstance(value, int):
            dtype = value
        elif number == 8 and isinstance(value, bytes):
            name = value.decode("utf-8", "replace")[:200]
        elif number == 9 and isinstance(value, bytes):
            payload = value
        elif number == 4 and isinstance(value, bytes):  # float_data, packed
            floats.extend(struct.unpack(f"<{len(value) // 4}f", value[:len(value) // 4 * 4]))
        elif number == 10 and isinstance(value, bytes):
            floats.extend(struct.unpack(f"<{len(value) // 8}d", value[:len(value) // 8 * 8]))
        elif number == 6:  # string_data
            dtype = _ONNX_STRING
        elif number in (13, 14) and (value or number == 13):
            external = True
    count = math.prod(dims) if dims else 0
    if dtype == _ONNX_STRING:
        return Tensor(name, "string", count), external
    if dtype in _ONNX_FLOAT:
        fmt, width = _ONNX_FLOAT[dtype]
        values: Sequence[float] = floats
        if payload and fmt is not None:
            n = min(len(payload) // width, MAX_DECODED)
            values = struct.unpack(f"<{n}{fmt}", payload[:n * width])
        return Tensor(name, "float", count, values[:MAX_DECODED]), external
    if dtype == _ONNX_BOOL:
        return Tensor(name, "bool", count), external
    if dtype in _ONNX_INT:
        return Tensor(name, "bytes" if dtype in (2, 3) else "int", count,
                      payload[:MAX_DECODED] if dtype in (2, 3) and payload else None), external
    return Tensor(name, "float", count), external


def onnx_tensors(data: bytes) -> tuple[list[Tensor], dict[str, str], bool]:
    """The initializers, metadata properties and whether any tensor is external."""
    graph = b""
    meta: dict[str, str] = {}
    for number, _wire, value in _fields(data):
        if number == 7 and isinstance(value, bytes):
            graph = value
        elif number == 14 and isinstance(value, bytes):  # StringStringEntryProto
            entry = {n: v for n, _w, v in _fields(value)}
            key, val = entry.get(1, b""), entry.get(2, b"")
            if isinstance(key, bytes) and isinstance(val, bytes):
                meta[key.decode("utf-8", "replace")[:200]] = val.decode("utf-8", "replace")
        elif number == 6 and isinstance(value, bytes):
            meta["doc_string"] = value.decode("utf-8", "replace")
    tensors: list[Tensor] = []
    external = False
    for number, _wire, value in _fields(graph):
        if number == 5 and isinstance(value, bytes):  # initializer
            tensor, ext = _tensor(value)
            tensors.append(tensor)
            external = external or ext
        elif number == 10 and isinstance(value, bytes):
            meta["graph doc_string"] = value.decode("utf-8", "replace")
    return tensors, meta, external


# -- JSON coefficients --------------------------------------------------------------------

def json_model(data: bytes) -> Any | None:
    """The parsed document when ``data`` is JSON naming coefficients, else None."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(doc, dict) and _COEF_KEYS & {str(k).lower() for k in doc}:
        return doc
    return None


def json_tensors(doc: Any) -> list[Tensor]:
    """Every list of numbers in ``doc`` as one tensor, every other number as one value."""
    tensors: list[Tensor] = []
    loose = 0
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{path}.{k}", v) for k, v in node.items())
        elif isinstance(node, list) and node and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in node):
            tensors.append(Tensor(path or "$", "float", len(node), [float(v) for v in node]))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(node))
        elif isinstance(node, int | float) and not isinstance(node, bool):
            loose += 1
    if loose:
        tensors.append(Tensor("scalars", "float", loose))
    return tensors


# -- the checks ---------------------------------------------------------------------------

def _suspect(t: Tensor) -> str | None:
    if t.dtype == "string":
        return "a string tensor"
    if t.count < MIN_SUSPECT:
        return None
    if t.dtype == "bytes" and isinstance(t.values, bytes) and t.values:
        printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in t.values)
        if printable >= 0.9 * len(t.values):
            return "a byte tensor of printable text"
        return "an 8-bit integer tensor"
    if t.dtype in ("int", "bool", "bytes"):
        return f"an {'integer' if t.dtype != 'bool' else 'boolean'} tensor"
    if t.dtype == "float" and t.values is not None and not isinstance(t.values, bytes):
        values = [v for v in t.values if math.isfinite(v)]
        if len(values) >= MIN_SUSPECT and all(float(v).is_integer() for v in values) \
                and len(set(values)) >= 3 and max(values) - min(values) <= INTEGRAL_RANGE:
            return "a float tensor whose values are all whole numbers in a small range"
    return None


def structural_checks(data: bytes, kind: str, training_rows: int | None) -> list[Check]:
    """The structural checks of a model file (see the module docstring)."""
    meta: dict[str, str] = {}
    external = False
    try:
        if kind == "safetensors":
            tensors, meta = safetensors_tensors(data)
        elif kind == "onnx":
            tensors, meta, external = onnx_tensors(data)
        else:
            doc = json_model(data)
            tensors = json_tensors(doc) if doc is not None else []
    except Malformed as err:
        return [Check("model_structure", FAIL, f"The {kind} model does not parse: {err}. "
                      "Save it again with the format's own library.", blocking=True)]
    params = sum(t.count for t in tensors)
    out = [Check("model_structure", PASS, f"A {kind} model of {len(tensors)} tensors and "
                 f"{params} parameters, read without loading it.",
                 details={"tensors": len(tensors), "parameters": params})]
    if external:
        out.append(Check("model_external_data", FAIL, "The model keeps tensors in files "
                         "outside it (external data): export one self-contained file.",
                         blocking=True))
    suspects = [(t.name[:100], why) for t in tensors if (why := _suspect(t)) is not None]
    if suspects:
        out.append(Check("model_embedded_data", FAIL, f"{len(suspects)} tensors look like "
                         f"embedded data rather than weights (first: {suspects[0][1]}): "
                         "remove them or explain to the reviewers what they hold.",
                         details={"tensors": [{"name": n, "why": w} for n, w in suspects[:50]]}))
    else:
        out.append(Check("model_embedded_data", PASS, "No tensor looks like embedded data."))
    long_meta = [k[:100] for k, v in meta.items() if len(v) > MAX_METADATA]
    if long_meta:
        out.append(Check("model_metadata", FAIL, f"{len(long_meta)} metadata entries hold "
                         f"more than {MAX_METADATA} characters of free text: remove them.",
                         details={"keys": long_meta[:20]}))
    if training_rows is None:
        out.append(Check("model_capacity", REVIEW, "No training_rows declared for this model: "
                         "add {\"evidence\": \"model\", \"file\": <name>, \"training_rows\": "
                         "<n>} to the request so parameters can be weighed against rows."))
    elif residual_dof_too_small(training_rows, params):
        out.append(Check("model_capacity", FAIL, f"{params} parameters for {training_rows} "
                         "training rows leave fewer than 10 residual degrees of freedom: the "
                         "model can memorise its rows. Use a smaller model or more rows.",
                         details={"parameters": params, "training_rows": training_rows}))
    else:
        out.append(Check("model_capacity", PASS, f"{params} parameters for {training_rows} "
                         "declared training rows.",
                         details={"parameters": params, "training_rows": training_rows}))
    return out
