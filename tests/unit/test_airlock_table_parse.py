"""The airlock's table parser (DuckDB over the quarantined file) is strict and types every
table the same way, from bytes or from a path; the vectorised checks see every row."""

from __future__ import annotations

import base64
import pickle
from pathlib import Path

import pytest

from spe.airlock import kinds
from spe.airlock.checks import Context, check_file, read_arrow

CTX = Context(permit_id="p", secret="unit-test-secret-of-at-least-32-chars!",
              allowed_kinds=frozenset({"csv", "tsv"}), max_rows=10**6)


@pytest.mark.parametrize("data", [
    b"a,b\n1,2\n3\n",              # a short row
    b"a,b\n1,2\n3,4,5\n",          # a long row (DuckDB would take it as the header otherwise)
    b"a,b\n" + b"1,2\n" * 30000 + b"3,4,5\n",
    b"a,n\nx,1\n\xff\xfe,2\n",     # not UTF-8 past the sniffed head
])
def test_malformed_tables_do_not_parse(data: bytes) -> None:
    with pytest.raises(ValueError):
        read_arrow(data, "csv")


def test_rows_are_all_counted_and_typed(tmp_path: Path) -> None:
    crlf = b"a,n\r\nx,10\r\ny,12\r\n"
    assert read_arrow(crlf, "csv").num_rows == 2  # DuckDB's Python read_csv reads 0 rows here
    late = b"a,n\n" + b"x,11\n" * 30000 + b"x,abc\n"  # past DuckDB's type sample
    table = read_arrow(late, "csv")
    assert table.num_rows == 30001 and table.column("n").type == "string"
    header_only_text = b"a,b\nx,y\nz,w\n"
    assert read_arrow(header_only_text, "csv").column_names == ["a", "b"]
    tsv = b"sex\tn\nF\t120\nM\t130\n"
    assert read_arrow(tsv, "tsv").column("n").to_pylist() == [120, 130]
    path = tmp_path / "t.csv"
    path.write_bytes(late)
    assert read_arrow(late, "csv", path).equals(table)


def test_encoded_file_deep_in_a_large_table_is_found() -> None:
    blob = base64.b64encode(pickle.dumps({"x": 1}, protocol=4)).decode()
    rows = [f"g{i % 7},{20 + i % 50},note" for i in range(200_000)]
    rows[150_000] = f"g1,20,{blob}"
    data = ("group,n,comment\n" + "\n".join(rows) + "\n").encode()
    assert kinds.sniff(data).kind == "csv"
    verdict = check_file(data, CTX)
    got = {c.name: c for c in verdict.checks}
    assert got["encoded_content"].outcome == "fail" and got["encoded_content"].blocking
    assert got["rows"].details == {"rows": 200_000}


def test_small_count_deep_in_a_large_table_and_distinct_dates() -> None:
    rows = [f"r{i % 100},{i % 28 + 1:02d},{100 + i % 9}" for i in range(100_000)]
    rows[99_000] = "r5,03,3"
    data = ("region,day,n\n" + "\n".join(rows) + "\n").encode()
    got = {c.name: c for c in check_file(data, CTX).checks}
    assert got["cell_counts"].outcome == "fail" and got["cell_counts"].details["cells"] == 1
    dates = "\n".join(f"2020-01-01,{i}" for i in range(5)) + "\n"
    distinct = "".join(f"{2000 + i // 365}-{i % 12 + 1:02d}-{i % 28 + 1:02d},1\n"
                       for i in range(40))
    for body, flagged in ((dates * 10, False), (distinct, True)):
        checks = {c.name: c for c in check_file(b"when,n\n" + body.encode(), CTX).checks}
        assert ("row_level_dates" in checks) is flagged
