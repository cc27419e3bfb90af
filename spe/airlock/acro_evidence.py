"""ACRO output folders: the researcher's own disclosure checks, shown as evidence.

Researchers who work with ACRO (the SACRO project's library) in the workspace end a session
with ``acro.finalise(folder, "json")``: the folder holds ``results.json`` and the files it
names. Its shape (ACRO's ``Records.finalise_json``)::

    {"version": "0.4.x",
     "results": {"output_0": {"uid": "output_0", "status": "fail" | "pass" | "review",
                              "type": "table" | "regression" | "custom" | ...,
                              "properties": {"method": "crosstab", ...},
                              "files": [{"name": "output_0_0.csv",
                                         "sdc": {"summary": {"suppressed": false,
                                                             "threshold": 2, "p-ratio": 0,
                                                             "nk-rule": 1, ...},
                                                 "cells": {...}}}],
                              "command": "...", "summary": "fail; threshold: 2 cells ...",
                              "timestamp": "...", "comments": [...], "exception": "..."}},
     "session_summary": {"DO_NOT_RELEASE": true, ...}}

Contract
--------
* :func:`parse` returns :class:`AcroResults` for bytes in that shape (``results`` a mapping of
  outputs each with a string ``status`` and a ``files`` list), None otherwise.
* :meth:`AcroResults.evidence` gives the ``acro_evidence`` check of the request's file called
  ``name`` (the display name the researcher uploaded it under, matched to ACRO's file name):
  always ``needs_review``, never a reason to release (our own checks still run on the file and
  decide alone); None when ACRO does not name the file. ACRO's own "do not release" session
  summary is a ``fail``.
* Text from the researcher's file (summaries, comments, exception requests) is cut to
  :data:`TEXT` characters; it is shown to reviewers as the researcher's claim.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spe.airlock.checks import FAIL, REVIEW, Check

TEXT = 500
_SDC_KEYS = ("suppressed", "negative", "missing", "threshold", "p-ratio", "nk-rule",
             "all-values-are-same")
_NOT_FOR_RELEASE = "DO_NOT_RELEASE"


def _text(value: object) -> str:
    return str(value)[:TEXT] if value not in (None, "") else ""


@dataclass(frozen=True)
class Output:
    uid: str
    status: str
    type: str
    method: str
    summary: str
    exception: str
    comments: tuple[str, ...]
    sdc: Mapping[str, Any]


@dataclass(frozen=True)
class AcroResults:
    version: str
    #: ACRO file name -> the output that wrote it.
    by_file: Mapping[str, Output]

    def evidence(self, name: str) -> Check | None:
        out = self.by_file.get(name)
        if out is None:
            return None
        details: dict[str, Any] = {
            "output": out.uid, "acro_status": out.status, "type": out.type,
            "method": out.method, "summary": out.summary, "sdc": dict(out.sdc),
            "exception_requested": out.exception, "comments": list(out.comments),
            "acro_version": self.version}
        if _NOT_FOR_RELEASE in name:
            return Check("acro_evidence", FAIL, "ACRO marks this file as its session summary "
                         "for output checkers, not for release: remove it from the request.",
                         details=details)
        said = f"ACRO ({out.uid}, {out.type}{', ' + out.method if out.method else ''}) says " \
               f"{out.status}"
        if out.summary and out.summary != out.status:
            said += f": {out.summary}"
        if out.exception:
            said += f". The researcher asks for an exception: {out.exception}"
        return Check("acro_evidence", REVIEW, f"Researcher's evidence, not trusted for "
                     f"release: {said[:2 * TEXT]}", details=details)

    def missing(self, names: set[str]) -> list[str]:
        """Files ACRO names that the request does not carry."""
        return sorted(n for n in self.by_file if n not in names)


def parse(data: bytes) -> AcroResults | None:
    """ACRO's ``results.json`` in ``data``, or None (see the module docstring)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, dict) or not results:
        return None
    by_file: dict[str, Output] = {}
    for key, val in results.items():
        if not (isinstance(val, dict) and isinstance(val.get("status"), str)
                and isinstance(val.get("files", []), list)):
            return None
        props = val.get("properties")
        for entry in val.get("files", []):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)):
                continue
            sdc = entry.get("sdc")
            summary = sdc.get("summary") if isinstance(sdc, dict) else None
            by_file[entry["name"][:200]] = Output(
                uid=_text(val.get("uid") or key), status=_text(val["status"]),
                type=_text(val.get("type")),
                method=_text(props.get("method")) if isinstance(props, dict) else "",
                summary=_text(val.get("summary")), exception=_text(val.get("exception")),
                comments=tuple(_text(c) for c in val.get("comments") or [] if c)[:20],
                sdc={k: summary[k] for k in _SDC_KEYS
                     if isinstance(summary, dict) and isinstance(summary.get(k), int | bool)})
    return AcroResults(_text(doc.get("version")), by_file)
