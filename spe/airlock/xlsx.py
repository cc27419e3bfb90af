"""XLSX workbooks: recognised from their content, refused unless plainly cells, read as tables.

Contract
--------
* :func:`inspect` takes bytes that start like a zip and returns None when they are not an
  Office Open XML workbook (``[Content_Types].xml`` and ``xl/workbook.xml``; other zips stay
  refused as archives by ``spe.airlock.kinds``), else an :class:`Inspected` whose ``refused``
  says why the workbook may not leave: macros (``vbaProject``, macro sheets, a macro-enabled
  content type: ``.xlsm``), external links or relationships that point outside the file,
  embedded objects (OLE, ActiveX, media, drawings), any part outside the allow-list of plain
  workbook parts, any part that is itself an archive, executable or pickle, bytes before or
  after the zip (a polyglot), an expansion past :data:`MAX_RATIO` or :data:`MAX_EXPANDED`
  (a zip bomb), and text the checked cell values would not show: formulas (of cells,
  conditional formats, data validations), defined names, hidden sheets, rows or columns, page
  header or footer text, free-text document properties, shared strings no cell uses.
  Nothing is parsed as XML before these checks pass (they search the parts' bytes).
* :func:`sheets` reads an accepted workbook with openpyxl (read-only, cached values, no
  links) into one Arrow table per sheet: the first row is the header; a column whose values
  do not share one type becomes text. Raises ValueError when it cannot be read.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass

import pyarrow as pa

from spe.airlock.kinds import dangerous

MAX_RATIO = 100
MAX_EXPANDED = 512 * 1024 * 1024

_ALLOWED = re.compile(
    r"^(?:\[Content_Types\]\.xml|_rels/\.rels|docProps/(?:app|core)\.xml|"
    r"xl/workbook\.xml|xl/_rels/workbook\.xml\.rels|xl/worksheets/sheet\d+\.xml|"
    r"xl/worksheets/_rels/sheet\d+\.xml\.rels|xl/styles\.xml|xl/sharedStrings\.xml|"
    r"xl/theme/theme\d+\.xml|xl/calcChain\.xml|xl/tables/table\d+\.xml|xl/metadata\.xml)$")
_MACROS = re.compile(r"vbaProject|/macrosheets/|/dialogsheets/|customUI|\.bin$", re.I)
_LINKS = re.compile(r"^xl/externalLinks/|/connections\.xml$|/queryTables/", re.I)
_EMBEDDED = re.compile(r"/embeddings/|/activeX/|oleObject|/media/|/drawings/|/ctrlProps/",
                       re.I)
_EOCD = b"PK\x05\x06"


@dataclass(frozen=True)
class Inspected:
    refused: str | None = None


def inspect(data: bytes) -> Inspected | None:
    """Is ``data`` a workbook, and may it leave? (See the module docstring.)"""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return None
    names = {i.filename for i in infos}
    if not {"[Content_Types].xml", "xl/workbook.xml"} <= names:
        return None
    if not data.startswith(b"PK\x03\x04") or data[-22:-18] != _EOCD:
        return Inspected("a workbook with other bytes before or after it (a polyglot file)")
    expanded = sum(i.file_size for i in infos)
    if expanded > MAX_EXPANDED or expanded > MAX_RATIO * max(len(data), 1):
        return Inspected("a workbook that expands far beyond its size (a zip bomb?)")
    for name in sorted(names):
        if _MACROS.search(name):
            return Inspected("a workbook with macros (.xlsm or a VBA project)")
        if _LINKS.search(name):
            return Inspected("a workbook with external links or data connections")
        if _EMBEDDED.search(name):
            return Inspected("a workbook with embedded objects (OLE, ActiveX, images or "
                             "drawings): export the cells only")
        if not _ALLOWED.match(name):
            return Inspected("a workbook with parts that are not plain cells")
    try:
        for info in infos:
            with archive.open(info) as member:
                head = member.read(512)
            if dangerous(head) is not None:
                return Inspected("a workbook hiding an archive, executable or pickle in a part")
        types = archive.read("[Content_Types].xml")
        if b"macroEnabled" in types or b"vbaProject" in types:
            return Inspected("a workbook with macros (.xlsm or a VBA project)")
        for name in names:
            if name.endswith(".rels") and b'TargetMode="External"' in archive.read(name):
                return Inspected("a workbook with links to outside files or addresses")
        hidden = _hidden_content(archive, names)
        if hidden is not None:
            return Inspected(hidden)
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError):
        return Inspected("a workbook whose parts cannot be read")
    return Inspected()


#: Cell formulas, and those of conditional formats and data validations.
_FORMULA = re.compile(rb"<(?:\w+:)?(?:f|formula\d?)[\s>/]")
#: Document properties that hold free text (the author's name and dates are allowed).
_FREE_TEXT_PROPERTY = re.compile(
    rb"<(?:\w+:)?(?:title|subject|description|keywords|category|Manager|Company|"
    rb"HyperlinkBase)>\s*[^<\s]")
#: Page headers and footers with text.
_HEADER_TEXT = re.compile(rb"<(?:\w+:)?(?:odd|even|first)(?:Header|Footer)>[^<]")
_DEFINED_NAME = re.compile(rb"<(?:\w+:)?definedName[\s>]")
_HIDDEN_SHEET = re.compile(rb'\sstate="(?:hidden|veryHidden)"')
_HIDDEN_CELLS = re.compile(rb'\shidden="(?:1|true)"')
_SHARED = re.compile(rb"<(?:\w+:)?si[\s>]")
_SHARED_REF = re.compile(rb'<(?:\w+:)?c\s[^>]*\bt="s"[^>]*>\s*<(?:\w+:)?v>\s*(\d+)\s*<')


def _hidden_content(archive: zipfile.ZipFile, names: set[str]) -> str | None:
    """Why the workbook could carry text that its cells' values do not show (formulas,
    defined names, hidden sheets, rows or columns, shared strings no cell uses), or None.
    Only the values are checked, so anything else must not be there."""
    for part in ("docProps/core.xml", "docProps/app.xml"):
        if part in names and _FREE_TEXT_PROPERTY.search(archive.read(part)):
            return ("a workbook with free-text document properties (title, subject, "
                    "description, keywords, category, company, manager): clear them")
    book = archive.read("xl/workbook.xml")
    if _DEFINED_NAME.search(book):
        return "a workbook with defined names (they can hold text): export values only"
    if _HIDDEN_SHEET.search(book):
        return "a workbook with hidden sheets: unhide or delete them"
    used: set[int] = set()
    for name in sorted(n for n in names if n.startswith("xl/worksheets/sheet")):
        sheet = archive.read(name)
        if _FORMULA.search(sheet):
            return ("a workbook with formulas (their text is not checked): paste the cells "
                    "as values and save again")
        if _HIDDEN_CELLS.search(sheet):
            return "a workbook with hidden rows or columns: unhide or delete them"
        if _HEADER_TEXT.search(sheet):
            return "a workbook with page header or footer text: remove it"
        used.update(int(i) for i in _SHARED_REF.findall(sheet))
    if "xl/sharedStrings.xml" in names:
        count = len(_SHARED.findall(archive.read("xl/sharedStrings.xml")))
        if used != set(range(count)):
            return ("a workbook whose string table holds text that no cell shows: save it "
                    "again as a new workbook with values only")
    return None


def _column(values: list[object]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def sheets(data: bytes) -> dict[str, pa.Table]:
    """Every sheet of an accepted workbook as a table (see the module docstring)."""
    import openpyxl  # imported here: only workbooks need it

    try:
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True,
                                      keep_links=False, keep_vba=False)
    except Exception as err:  # noqa: BLE001 - any reader error means "not a table"
        raise ValueError(type(err).__name__) from None
    out: dict[str, pa.Table] = {}
    try:
        for sheet in book.worksheets:
            rows = [list(r) for r in sheet.iter_rows(values_only=True)]
            while rows and all(v is None for v in rows[-1]):
                rows.pop()
            if not rows:
                out[sheet.title] = pa.table({})
                continue
            width = max(len(r) for r in rows)
            header = [str(h) if h is not None else f"column_{i + 1}"
                      for i, h in enumerate(rows[0] + [None] * (width - len(rows[0])))]
            if len(set(header)) != len(header):
                raise ValueError("duplicate column names")
            body = [r + [None] * (width - len(r)) for r in rows[1:]]
            out[sheet.title] = pa.table({h: _column([r[i] for r in body])
                                         for i, h in enumerate(header)})
    finally:
        book.close()
    return out
