"""Models in the airlock (spe.airlock.models_check, spe.airlock.mia_job): safetensors, ONNX and
JSON coefficients go to review with structural checks; other model containers are refused;
the membership-inference job runs in its own environment and its result lands on the file.

safetensors and ONNX files are written here byte by byte from the formats' specifications
(the 8-byte header length + JSON header + buffer of safetensors; ONNX's protobuf ModelProto),
because neither library is installed in the project environment. None is released."""

from __future__ import annotations

import io
import json
import pickle
import stat
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from permits.schemas import PermitCreate
from permits.service import PermitService
from spe.airlock import kinds, models_check
from spe.airlock.service import AirlockService
from spe.audit.models import AuditEntry
from spe.auth.principal import Principal, Role
from spe.config import Settings
from spe.db import Database
from tests.integration.test_permit_service import ALPHA, body, register_dataset

ALICE = Principal(subject="al", username="alice", kind="user",
                  roles=frozenset({Role.RESEARCHER}))

WEIGHTS = [0.113, -0.52, 1.731, 0.004, -2.25, 0.618, 0.0071, 3.14159]


def safetensors(tensors: dict[str, tuple[str, list[int], bytes]], meta: dict[str, str] |
                None = None, tail: bytes = b"") -> bytes:
    header: dict[str, Any] = {}
    buf = b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(buf), len(buf) + len(data)]}
        buf += data
    if meta is not None:
        header["__metadata__"] = meta
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + buf + tail


def f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def pb(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def onnx(initializers: list[bytes], doc: str = "") -> bytes:
    """ModelProto{ir_version 8, opset 13, graph{MatMul x W -> y, initializers}}."""
    node = pb(1, "x") + pb(1, "W") + pb(2, "y") + pb(4, "MatMul")
    graph = pb(1, node) + pb(2, "g") + b"".join(pb(5, t) for t in initializers) \
        + pb(11, pb(1, "x")) + pb(12, pb(1, "y"))
    model = pb(1, 8) + pb(2, "hand-written") + pb(7, graph) + pb(8, pb(2, 13))
    return model + (pb(6, doc) if doc else b"")


def tensor(name: str, dims: list[int], dtype: int, raw: bytes = b"",
           external: bool = False, strings: list[bytes] | None = None) -> bytes:
    out = b"".join(pb(1, d) for d in dims) + pb(2, dtype) + pb(8, name)
    out += pb(9, raw) if raw else b""
    for s in strings or []:
        out += pb(6, s)
    if external:
        out += pb(13, pb(1, "location") + pb(2, "weights.bin")) + pb(14, 1)
    return out


@pytest.fixture
def setup(db: Database, tmp_path: Path) -> tuple[PermitService, AirlockService, str]:
    register_dataset(db)
    permits = PermitService(db)
    pid = permits.issue(ALPHA, PermitCreate.model_validate(body(export_policy={
        "allowed_kinds": ["csv", "json", "txt"]}))).permit_id
    settings = Settings(data_dir=tmp_path / "data", database_url=db.url)
    return permits, AirlockService(db, settings), pid


def _submit(airlock: AirlockService, pid: str, name: str, data: bytes,
            rows: int | None = 1000) -> dict[str, Any]:
    evidence = [{"evidence": "model", "file": name, "training_rows": rows}] if rows else []
    req = airlock.create(ALICE, pid, "the fitted model for the paper", evidence)
    airlock.upload(ALICE, pid, req["id"], name, data)
    return airlock.submit(ALICE, pid, req["id"])


def _checks(got: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in got["files"][0]["checks"]}


GOOD = {
    "safetensors": ("model.safetensors", safetensors({"w": ("F32", [4, 2], f32(WEIGHTS))},
                                                     {"format": "pt"})),
    "onnx": ("model.onnx", onnx([tensor("W", [4, 2], 1, f32(WEIGHTS))])),
    "json_model": ("coef.json", json.dumps({"coefficients": WEIGHTS[:3], "intercept": 0.3,
                                            "features": ["age", "sex", "bmi"]}).encode()),
}


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_safe_model_passes_structure_and_goes_to_review(
        setup: tuple[PermitService, AirlockService, str], kind: str) -> None:
    _p, airlock, pid = setup
    name, data = GOOD[kind]
    got = _submit(airlock, pid, name, data)
    checks = _checks(got)
    assert checks["model_structure"]["outcome"] == "pass", checks
    assert checks["model_embedded_data"]["outcome"] == "pass"
    assert checks["model_capacity"]["outcome"] == "pass"
    assert checks["model_mia"]["outcome"] == "needs_review"
    assert "MIA not run: no SACRO-ML environment configured" in checks["model_mia"]["reason"]
    assert got["state"] == "in_review" and got["files"][0]["outcome"] == "needs_review"


AGES = [float(20 + (i * 7) % 70) for i in range(64)]
TEXT = b"alice smith 1970-01-01; bob jones 1982-03-04; carol " * 2

BAD_STRUCTURE = {
    "integer_tensor": safetensors({"w": ("F32", [4, 2], f32(WEIGHTS)),
                                   "ids": ("I64", [40], struct.pack("<40q", *range(40)))}),
    "whole_number_floats": safetensors({"w": ("F32", [64], f32(AGES))}),
    "text_bytes": safetensors({"w": ("F32", [4, 2], f32(WEIGHTS)),
                               "blob": ("U8", [len(TEXT)], TEXT)}),
    "long_metadata": safetensors({"w": ("F32", [4, 2], f32(WEIGHTS))},
                                 {"notes": "patient list " * 200}),
    "onnx_int_tensor": onnx([tensor("W", [4, 2], 1, f32(WEIGHTS)),
                             tensor("codes", [50], 7, struct.pack("<50q", *range(50)))]),
    "onnx_string_tensor": onnx([tensor("W", [4, 2], 1, f32(WEIGHTS)),
                                tensor("names", [2], 8, strings=[b"alice", b"bob"])]),
    "json_integer_coefficients": json.dumps({"coef": [int(a) for a in AGES]}).encode(),
}


@pytest.mark.parametrize("case", sorted(BAD_STRUCTURE))
def test_tensors_that_look_like_data_fail(
        setup: tuple[PermitService, AirlockService, str], case: str) -> None:
    _p, airlock, pid = setup
    got = _submit(airlock, pid, "model.bin", BAD_STRUCTURE[case], rows=100_000)
    checks = _checks(got)
    failing = [c for c in checks.values() if c["outcome"] == "fail"]
    assert {c["name"] for c in failing} & {"model_embedded_data", "model_metadata"}, checks
    assert got["state"] == "in_review" and got["files"][0]["outcome"] == "needs_review"


@pytest.mark.parametrize("case", ["hidden_tail", "offsets_outside", "external_data"])
def test_malformed_or_external_container_is_returned(
        setup: tuple[PermitService, AirlockService, str], case: str) -> None:
    _p, airlock, pid = setup
    good = safetensors({"w": ("F32", [4, 2], f32(WEIGHTS))})
    data = {"hidden_tail": safetensors({"w": ("F32", [4, 2], f32(WEIGHTS))},
                                       tail=b"secret rows"),
            "offsets_outside": good[:-8],
            "external_data": onnx([tensor("W", [4, 2], 1, external=True)])}[case]
    got = _submit(airlock, pid, "model.safetensors", data)
    assert got["state"] == "returned_for_changes", _checks(got)
    assert any(c["blocking"] and c["outcome"] == "fail" for c in got["files"][0]["checks"])


def test_parameters_against_declared_rows(
        setup: tuple[PermitService, AirlockService, str]) -> None:
    _p, airlock, pid = setup
    name, data = GOOD["safetensors"]
    few = _checks(_submit(airlock, pid, name, data, rows=12))["model_capacity"]
    assert few["outcome"] == "fail" and "memorise" in few["reason"]
    undeclared = _checks(_submit(airlock, pid, name, data, rows=None))["model_capacity"]
    assert undeclared["outcome"] == "needs_review" and "training_rows" in undeclared["reason"]


def _torch_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": [0.1]}))
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


REFUSED = {
    "pickle_named_pt": ("model.pt", pickle.dumps({"w": [0.1, 0.2]})),
    "pickle_named_pth": ("model.pth", pickle.dumps([0.1, 0.2], protocol=2)),
    "joblib_compressed": ("model.joblib", zlib.compress(pickle.dumps({"w": [0.1]}))),
    "torch_zip_archive": ("model.pth", _torch_zip()),
    "keras_hdf5": ("model.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 64),
    "gguf": ("model.gguf", b"GGUF\x03\x00\x00\x00" + b"\x00" * 32),
    "tflite": ("model.tflite", b"\x1c\x00\x00\x00TFL3" + b"\x00" * 32),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_other_model_containers_are_refused(
        setup: tuple[PermitService, AirlockService, str], case: str) -> None:
    _p, airlock, pid = setup
    name, data = REFUSED[case]
    assert kinds.sniff(data).refused is not None
    got = _submit(airlock, pid, name, data)
    kind = _checks(got)["file_kind"]
    assert kind["outcome"] == "fail" and kind["blocking"]
    assert got["state"] == "returned_for_changes"


def test_sniffing_recognises_onnx_and_nothing_else_as_onnx() -> None:
    assert kinds.sniff(GOOD["onnx"][1]).kind == "onnx"
    assert kinds.sniff(b"ward,n\nA,20\n").kind == "csv"
    assert kinds.sniff(b"\x08\x08\x00garbage").kind == "unknown"
    assert models_check.model_kind("json", b'{"rows": [1, 2]}') is None


# -- membership-inference job ------------------------------------------------------------

def _configured(airlock: AirlockService, python: Path) -> AirlockService:
    settings = airlock.settings.model_copy(update={"airlock_sacroml_python": python,
                                                   "airlock_mia_timeout_seconds": 60.0})
    return AirlockService(airlock.db, settings)


def _after_jobs(airlock: AirlockService, pid: str, request_id: str) -> dict[str, Any]:
    for thread in airlock.mia_threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    return airlock.get(ALICE, pid, request_id)


def test_mia_job_result_is_stored_on_the_file_and_audited(
        setup: tuple[PermitService, AirlockService, str], tmp_path: Path, db: Database) -> None:
    """SACRO-ML (with PyTorch) cannot be installed here, so a stand-in interpreter plays the
    configured environment: an executable that ignores the job script and prints what an
    attack that found members would report. It tests the runner, the storage on the file,
    the audit entry and that a failed attack never releases the model."""
    _p, plain, pid = setup
    stand_in = tmp_path / "sacroml-python"
    stand_in.write_text('#!/bin/sh\ncat >/dev/null\necho \'{"outcome": "fail", "summary": '
                        '"stand-in attack: members told apart (AUC 0.91)", '
                        '"metrics": {"auc": 0.91}}\'\n')
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    airlock = _configured(plain, stand_in)
    name, data = GOOD["safetensors"]
    got = _submit(airlock, pid, name, data)
    assert _checks(got)["model_mia"]["details"]["state"] == "queued"
    done = _checks(_after_jobs(airlock, pid, got["id"]))["model_mia"]
    assert done["outcome"] == "fail" and "AUC 0.91" in done["reason"]
    assert done["details"]["metrics"] == {"auc": 0.91}
    after = airlock.get(ALICE, pid, got["id"])
    assert after["state"] == "in_review" and after["files"][0]["outcome"] == "needs_review"
    with db.read() as s:
        actions = list(s.execute(select(AuditEntry.action).where(
            AuditEntry.action == "airlock.mia")).scalars())
    assert actions == ["airlock.mia"]


def test_mia_job_with_the_real_script_and_no_sacroml(
        setup: tuple[PermitService, AirlockService, str]) -> None:
    """The shipped job script run by an interpreter without SACRO-ML (this test's own): it
    must say the attack did not run, never pass."""
    _p, plain, pid = setup
    airlock = _configured(plain, Path(sys.executable))
    name, data = GOOD["onnx"]
    got = _submit(airlock, pid, name, data)
    done = _checks(_after_jobs(airlock, pid, got["id"]))["model_mia"]
    assert done["outcome"] == "needs_review" and "MIA not run" in done["reason"]


def test_mia_job_that_breaks_goes_to_review(
        setup: tuple[PermitService, AirlockService, str], tmp_path: Path) -> None:
    """A stand-in interpreter (see above) that prints garbage and fails."""
    _p, plain, pid = setup
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho '{\"outcome\": \"pass\"'\nexit 3\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    airlock = _configured(plain, broken)
    name, data = GOOD["json_model"]
    got = _submit(airlock, pid, name, data)
    done = _checks(_after_jobs(airlock, pid, got["id"]))["model_mia"]
    assert done["outcome"] == "needs_review" and "failed" in done["reason"]


ADMINS = [Principal(subject=f"h{i}", username=f"hadmin{i}", kind="user",
                    roles=frozenset({Role.HOSPITAL_ADMIN})) for i in (1, 2)]


def _stand_in(tmp_path: Path, name: str, body_: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\ncat >/dev/null\n{body_}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_approving_waits_for_the_attack_result(
        setup: tuple[PermitService, AirlockService, str], tmp_path: Path) -> None:
    """A stand-in attack (see above) that waits until the test lets it answer: while it runs,
    an approval is refused; rejecting is not; once it answered, approval counts."""
    from spe.errors import Conflict

    _p, plain, pid = setup
    go = tmp_path / "go"
    slow = _stand_in(tmp_path, "slow-python",
                     f"while [ ! -e {go} ]; do sleep 0.05; done\n"
                     'echo \'{"outcome": "needs_review", "summary": "stand-in: AUC 0.52"}\'')
    airlock = _configured(plain, slow)
    name, data = GOOD["onnx"]
    got = _submit(airlock, pid, name, data)
    assert _checks(got)["model_mia"]["details"]["state"] == "queued"
    with pytest.raises(Conflict, match="has not finished"):
        airlock.vote(ADMINS[0], pid, got["id"], "approve", None, False, None, None)
    go.touch()
    done = _after_jobs(airlock, pid, got["id"])
    assert "AUC 0.52" in _checks(done)["model_mia"]["reason"]
    for admin in ADMINS:
        airlock.vote(admin, pid, got["id"], "approve", None, False, None, None)
    assert airlock.get(ALICE, pid, got["id"])["state"] == "released"


def test_a_job_lost_with_its_process_runs_again_at_start(
        setup: tuple[PermitService, AirlockService, str], tmp_path: Path,
        db: Database) -> None:
    """The SPE stopped while a job ran (simulated: the stored check put back to queued):
    the next start runs it again; without an environment it says the attack did not run."""
    from spe.airlock.models import ExportFile

    _p, plain, pid = setup
    answer = _stand_in(tmp_path, "answer-python",
                       'echo \'{"outcome": "fail", "summary": "stand-in: AUC 0.88"}\'')
    airlock = _configured(plain, answer)
    got = _submit(airlock, pid, *GOOD["safetensors"])
    queued = _checks(got)["model_mia"]
    _after_jobs(airlock, pid, got["id"])

    def lose_result() -> None:
        with db.write() as s:
            row = s.get(ExportFile, got["files"][0]["id"])
            assert row is not None
            row.checks = [c for c in row.checks if c["name"] != "model_mia"] + [queued]

    lose_result()
    restarted = _configured(plain, answer)
    assert restarted.resume_mia_jobs() == 1
    done = _checks(_after_jobs(restarted, pid, got["id"]))["model_mia"]
    assert done["outcome"] == "fail" and "AUC 0.88" in done["reason"]
    assert restarted.resume_mia_jobs() == 0  # nothing waits any more

    lose_result()
    unconfigured = AirlockService(db, plain.settings)
    assert unconfigured.resume_mia_jobs() == 1
    after = _checks(unconfigured.get(ALICE, pid, got["id"]))["model_mia"]
    assert "MIA not run" in after["reason"] and after["details"].get("state") != "queued"
    unconfigured.vote(ADMINS[0], pid, got["id"], "approve", None, False, None, None)
