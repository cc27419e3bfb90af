"""XLSX exports: a workbook of plain cells is checked as tables (each sheet); macros, external
links, embedded objects, zips in disguise and polyglots are refused; other zips stay refused.
Workbooks are written by openpyxl and altered part by part with zipfile."""

from __future__ import annotations

import io
import zipfile

import openpyxl
import pytest

from spe.airlock import kinds, xlsx
from spe.airlock.checks import Context, check_file

CTX = Context(permit_id="p", secret="unit-test-secret-of-at-least-32-chars!",
              allowed_kinds=frozenset({"csv", "xlsx"}))


def workbook(*sheets: tuple[str, list[list[object]]]) -> bytes:
    book = openpyxl.Workbook()
    book.remove(book.active)
    for title, rows in sheets:
        sheet = book.create_sheet(title)
        for row in rows:
            sheet.append(row)
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


def altered(data: bytes, add: dict[str, bytes], types: bytes | None = None,
            replace: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            body = (replace or {}).get(info.filename) or src.read(info)
            if info.filename == "[Content_Types].xml" and types is not None:
                body = body.replace(b"</Types>", types + b"</Types>")
            dst.writestr(info.filename, body)
        for name, body in add.items():
            dst.writestr(name, body)
    return out.getvalue()


PLAIN = workbook(("by sex", [["sex", "n"], ["F", 120], ["M", 130]]),
                 ("by region", [["region", "n"], ["north", 40], ["south", 3]]))


def test_plain_workbook_is_a_table_checked_per_sheet() -> None:
    assert kinds.sniff(PLAIN) == kinds.Sniffed("xlsx")
    verdict = check_file(PLAIN, CTX)
    assert verdict.kind == "xlsx" and verdict.outcome == "needs_review"  # reviewers decide
    counts = [c for c in verdict.checks if c.name == "cell_counts"]
    assert [(c.details["sheet"], c.outcome) for c in counts] == [("by sex", "pass"),
                                                                 ("by region", "fail")]
    assert counts[1].reason.startswith("Sheet by region: 1 cells")
    assert not verdict.blocked


def test_identifiers_and_row_limit_in_a_sheet() -> None:
    rows: list[list[object]] = [["patient_id", "n"]] + [[f"p{i}", 12] for i in range(30)]
    got = check_file(workbook(("s", rows)), Context(**{**CTX.__dict__, "max_rows": 10}))
    by = {c.name: c for c in got.checks}
    assert by["identifiers"].outcome == "fail" and by["rows"].blocking and got.blocked


def test_workbook_needs_the_permit_to_allow_it() -> None:
    got = check_file(PLAIN, Context(**{**CTX.__dict__, "allowed_kinds": frozenset({"csv"})}))
    assert got.blocked and "does not allow" in got.checks[0].reason


@pytest.mark.parametrize(("add", "types", "why"), [
    ({"xl/vbaProject.bin": b"\xd0\xcf\x11\xe0" + b"\x00" * 100}, None, "macros"),
    ({}, b'<Override PartName="/xl/workbook.xml" ContentType="application/'
         b'vnd.ms-excel.sheet.macroEnabled.main+xml"/>', "macros"),
    ({"xl/macrosheets/sheet1.xml": b"<xml/>"}, None, "macros"),
    ({"xl/externalLinks/externalLink1.xml": b"<externalLink/>"}, None, "external links"),
    ({"xl/embeddings/oleObject1.bin": b"\xd0\xcf\x11\xe0"}, None, "macros"),
    ({"xl/embeddings/Microsoft_Word_Document.docx": b"PK\x03\x04"}, None, "embedded"),
    ({"xl/media/image1.png": b"\x89PNG\r\n\x1a\n"}, None, "embedded"),
    ({"xl/worksheets/sheet9.xml": b"PK\x03\x04" + b"\x00" * 40}, None, "hiding an archive"),
    ({"xl/worksheets/_rels/sheet1.xml.rels": b'<Relationships><Relationship Id="r1" '
      b'Target="https://example.org/x" TargetMode="External"/></Relationships>'}, None,
     "outside"),
    ({"payload.txt": b"hello"}, None, "not plain cells"),
])
def test_workbooks_that_carry_more_than_cells_are_refused(add: dict[str, bytes],
                                                          types: bytes | None,
                                                          why: str) -> None:
    data = altered(PLAIN, add, types)
    sniffed = kinds.sniff(data)
    assert sniffed.kind == "xlsx" and sniffed.refused is not None and why in sniffed.refused
    verdict = check_file(data, CTX)
    assert verdict.blocked and verdict.outcome == "fail"


def test_polyglot_and_bomb_and_other_zips() -> None:
    assert "polyglot" in str(kinds.sniff(PLAIN + b"#!/bin/sh\necho hi\n").refused)
    bomb = altered(PLAIN, {"xl/worksheets/sheet3.xml": b" " * (60 * 1024 * 1024)})
    assert "zip bomb" in str(kinds.sniff(bomb).refused)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("table.csv", "a,n\nx,10\n")
    assert kinds.sniff(buf.getvalue()) == kinds.Sniffed("zip", "zip archive content is never "
                                                        "exported")
    assert xlsx.inspect(buf.getvalue()) is None


def test_mixed_column_becomes_text_and_unreadable_workbook_fails_to_parse() -> None:
    tables = xlsx.sheets(workbook(("s", [["label", "n"], ["a", 10], [3, 12]])))
    assert tables["s"].column("label").to_pylist() == ["a", "3"]
    broken = altered(PLAIN, {}, replace={"xl/worksheets/sheet1.xml": b"<worksheet><<"})
    verdict = check_file(broken, CTX)
    assert verdict.kind == "xlsx" and verdict.blocked
    assert [c.name for c in verdict.checks if c.outcome == "fail"] == ["table_parse"]


def _validation() -> object:
    from openpyxl.worksheet.datavalidation import DataValidation

    rule = DataValidation(type="list", formula1='"row-level text,more text"')
    rule.add("A2")
    return rule


def _book(edit: object) -> bytes:
    book = openpyxl.Workbook()
    sheet = book.active
    for row in (["sex", "n"], ["F", 120], ["M", 130]):
        sheet.append(row)
    edit(book)  # type: ignore[operator]
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


@pytest.mark.parametrize(("edit", "why"), [
    (lambda b: b.active.append(["X", "=1+2"]), "formulas"),
    (lambda b: b.defined_names.add(openpyxl.workbook.defined_name.DefinedName(
        "note", attr_text='"row-level text"')), "defined names"),
    (lambda b: setattr(b.create_sheet("raw"), "sheet_state", "hidden"), "hidden sheets"),
    (lambda b: setattr(b.active.row_dimensions[2], "hidden", True), "hidden rows"),
    (lambda b: setattr(b.active.column_dimensions["A"], "hidden", True), "hidden rows"),
    (lambda b: setattr(b.active.oddHeader.center, "text", "patient 4711"), "header"),
    (lambda b: b.active.add_data_validation(_validation()), "formulas"),
    (lambda b: setattr(b.properties, "description", "patient 4711, born 1970"), "properties"),
    (lambda b: setattr(b.properties, "keywords", "row-level"), "properties"),
])
def test_text_the_checked_values_would_not_show_is_refused(edit: object, why: str) -> None:
    data = _book(edit)
    refused = kinds.sniff(data).refused
    assert refused is not None and why in refused
    assert kinds.sniff(_book(lambda b: None)) == kinds.Sniffed("xlsx")


SST_TYPE = (b'<Override PartName="/xl/sharedStrings.xml" ContentType="application/'
            b'vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/>')
SHEET = (b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
         b'<sheetData><row r="1"><c r="A1" t="s"><v>0</v></c><c r="B1" t="s"><v>1</v></c>'
         b'</row><row r="2"><c r="A2" t="s"><v>2</v></c><c r="B2"><v>120</v></c></row>'
         b'</sheetData></worksheet>')


def _sst(*strings: str) -> bytes:
    items = "".join(f"<si><t>{s}</t></si>" for s in strings)
    return (f'<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" '
            f'count="{len(strings)}" uniqueCount="{len(strings)}">{items}</sst>').encode()


def test_shared_strings_are_read_and_unused_ones_refused() -> None:
    plain = _book(lambda b: None)
    ok = altered(plain, {"xl/sharedStrings.xml": _sst("sex", "n", "F")}, SST_TYPE,
                 replace={"xl/worksheets/sheet1.xml": SHEET})
    assert kinds.sniff(ok) == kinds.Sniffed("xlsx")
    assert xlsx.sheets(ok)["Sheet"].to_pylist() == [{"sex": "F", "n": 120}]
    smuggled = altered(plain, {"xl/sharedStrings.xml": _sst("sex", "n", "F", "1970-01-01 "
                                                            "patient 4711")}, SST_TYPE,
                       replace={"xl/worksheets/sheet1.xml": SHEET})
    assert "no cell shows" in str(kinds.sniff(smuggled).refused)
