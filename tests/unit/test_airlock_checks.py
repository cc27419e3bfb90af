"""Automated checks of one file: each with a passing and a failing file, disguised ones too.

Real receipts are signed with spe.dp.receipt, real tables parsed with pandas and pyarrow."""

from __future__ import annotations

import base64
import io
import pickle
import zipfile

import pandas as pd

from spe.airlock.checks import Context, FileVerdict, ReleasedTable, check_file
from spe.dp import receipt

SECRET = "unit-test-secret-of-at-least-32-chars!"
PERMIT = "permit-a"
KINDS = frozenset({"csv", "tsv", "parquet", "png", "pdf", "txt"})


def ctx(**kw: object) -> Context:
    base: dict[str, object] = {"permit_id": PERMIT, "secret": SECRET, "allowed_kinds": KINDS}
    base.update(kw)
    return Context(**base)  # type: ignore[arg-type]


def outcomes(v: FileVerdict) -> dict[str, str]:
    return {c.name: c.outcome for c in v.checks}


def dp_release(permit: str = PERMIT) -> tuple[bytes, bytes, dict[str, object]]:
    table = pd.DataFrame({"gender_concept_id": [8507, 8532], "n": [73.2, 81.9]})
    csv, parquet = receipt.output_bytes(table)
    r = receipt.sign(SECRET, permit_id=permit, charge_id="c1", dataset="omop", csv=csv,
                     parquet=parquet, epsilon=0.5, delta=0.0, issued_at="2026-12-05T10:00:00",
                     rows=2, columns=["gender_concept_id", "n"])
    return csv, parquet, r


def test_dp_receipt_releases_exact_bytes_only() -> None:
    csv, parquet, r = dp_release()
    for data in (csv, parquet):
        v = check_file(data, ctx(receipts=[r]))
        assert v.outcome == "pass" and outcomes(v)["dp_receipt"] == "pass"
    changed = csv.replace(b"73.2", b"73.3")
    v = check_file(changed, ctx(receipts=[r]))
    assert v.outcome != "pass" and "dp_receipt" not in outcomes(v)


def test_dp_receipt_of_another_permit_or_forged_fails() -> None:
    csv, _p, r = dp_release(permit="permit-b")
    v = check_file(csv, ctx(receipts=[r]))
    assert v.outcome != "pass" and outcomes(v)["dp_receipt"] == "fail"
    _c, _p, good = dp_release()
    forged = {**good, "epsilon": 0.01}
    v = check_file(csv, ctx(receipts=[forged]))
    assert v.outcome != "pass"
    wrong_key = receipt.sign("another-secret-another-secret-xx", **{
        k: good[k] for k in ("permit_id", "charge_id", "dataset", "epsilon", "delta",
                             "issued_at", "rows", "columns")}, csv=csv, parquet=b"")  # type: ignore[arg-type]
    v = check_file(csv, ctx(receipts=[wrong_key]))
    assert v.outcome != "pass" and outcomes(v)["dp_receipt"] == "fail"


def test_csv_named_png_is_a_table() -> None:
    v = check_file(b"sex,n\nF,120\nM,130\n", ctx())
    assert v.kind == "csv" and v.outcome == "needs_review"
    assert outcomes(v)["cell_counts"] == "pass"


def test_small_count_hidden_among_large_ones() -> None:
    rows = "\n".join(f"g{i},{100 + i}" for i in range(40))
    v = check_file(f"group,n\n{rows}\ng40,3\n".encode(), ctx())
    assert outcomes(v)["cell_counts"] == "fail"
    assert "1 cells count fewer than 10" in next(c.reason for c in v.checks
                                                  if c.name == "cell_counts")
    assert "3" not in next(c.reason for c in v.checks if c.name == "cell_counts").replace(
        "fewer than 10", "")


def test_zeros_flagged() -> None:
    v = check_file(b"group,n\na,0\nb,40\n", ctx())
    assert outcomes(v)["zeros"] == "needs_review"


def test_parquet_named_csv_checked_as_parquet() -> None:
    buf = io.BytesIO()
    pd.DataFrame({"group": ["a", "b"], "n": [4, 50]}).to_parquet(buf)
    v = check_file(buf.getvalue(), ctx())
    assert v.kind == "parquet" and outcomes(v)["cell_counts"] == "fail"


def test_parquet_not_allowed_by_permit_is_blocked() -> None:
    buf = io.BytesIO()
    pd.DataFrame({"group": ["a"], "n": [40]}).to_parquet(buf)
    v = check_file(buf.getvalue(), ctx(allowed_kinds=frozenset({"csv"})))
    assert v.blocked and outcomes(v)["file_kind"] == "fail"


def test_zip_in_a_csv_column_as_base64() -> None:
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("rows.csv", "person_id,dob\n1,1970-01-01\n")
    blob = base64.b64encode(zbuf.getvalue()).decode()
    v = check_file(f"group,n,note\na,40,{blob}\nb,50,x\n".encode(), ctx())
    assert v.blocked and outcomes(v)["encoded_content"] == "fail"


def test_pickle_named_pt_is_refused() -> None:
    v = check_file(pickle.dumps({"state_dict": [1.0, 2.0]}), ctx())
    assert v.blocked and v.outcome == "fail" and "pickle" in v.checks[0].reason.lower()


def test_identifier_columns() -> None:
    named = check_file(b"person_id,n\n1,40\n2,50\n", ctx())
    assert outcomes(named)["identifiers"] == "fail"
    rows = "\n".join(f"{i:08x}-aaaa-bbbb-cccc-{i:012x},{20 + i}" for i in range(30))
    valued = check_file(f"ref,value\n{rows}\n".encode(), ctx())
    assert outcomes(valued)["identifiers"] == "fail"
    dob = check_file(b"date_of_birth,n\n1970,40\n", ctx())
    assert outcomes(dob)["identifiers"] == "fail"
    clean = check_file(b"sex,n\nF,40\nM,50\n", ctx())
    assert outcomes(clean)["identifiers"] == "pass"


def test_row_limit() -> None:
    rows = "\n".join(f"g{i},{100 + i}" for i in range(30))
    v = check_file(f"group,n\n{rows}\n".encode(), ctx(max_rows=20))
    assert v.blocked and outcomes(v)["rows"] == "fail"


def test_differs_from_earlier_release_by_one_person() -> None:
    old = pd.DataFrame({"sex": ["F", "M"], "n": [120, 130]})
    released = [ReleasedTable("r1", "f1", old)]
    v = check_file(b"sex,n\nF,121\nM,130\n", ctx(released_tables=released))
    assert outcomes(v)["differencing"] == "fail"
    v = check_file(b"sex,n\nF,160\nM,190\n", ctx(released_tables=released))
    assert outcomes(v)["differencing"] == "pass"


def test_images_and_text_go_to_review_never_pass() -> None:
    for data in (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, b"%PDF-1.4\n", b"free text\n"):
        v = check_file(data, ctx())
        assert v.outcome == "needs_review"


def test_already_released_hash_is_recognised() -> None:
    from spe.airlock.checks import sha256

    data = b"sex,n\nF,40\nM,50\n"
    v = check_file(data, ctx(released_hashes=frozenset({sha256(data)})))
    assert outcomes(v)["already_released"] == "pass"


def test_acro_results_are_evidence_for_reviewers_only() -> None:
    import json

    doc = {"version": "0.4", "results": {
        "output_0": {"status": "pass", "type": "table", "summary": "pass"},
        "output_1": {"status": "fail", "type": "table", "summary": "fail; threshold: 2 cells"},
    }}
    v = check_file(json.dumps(doc).encode(), ctx(allowed_kinds=KINDS | {"json"}))
    assert v.outcome == "needs_review"
    evidence = next(c for c in v.checks if c.name == "acro_evidence")
    assert evidence.details == {"outputs": 2, "status": {"fail": 1, "pass": 1}}
    plain = check_file(b'{"coef": [0.1]}', ctx(allowed_kinds=KINDS | {"json"}))
    assert "acro_evidence" not in outcomes(plain)
