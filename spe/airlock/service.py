"""Export requests: the airlock's business logic over the control database and quarantine.

Contract
--------
* Every public method takes the caller (a :class:`~spe.auth.principal.Principal`) and the
  permit id, authorises by role and permit first (a permit or request the caller may not see
  is 404, never 403: ``permits.policy``), then acts in one transaction with its audit entries
  (``spe.audit.record``): an act and its record commit together.
* Researchers (user or workspace token of this permit, named in it) open requests, upload
  files, submit, withdraw, revise; only the requester changes their own request.
* Hospital admins (user tokens) other than the requester vote; a vote is seen by nobody but its
  author until that reviewer has voted too (and by the researcher only when shared, after the
  decision). The request is decided when ``reviewers_required`` votes are in (see
  ``spe.airlock.states``).
* Released files are downloaded only by persons the permit names, with their own (user) token,
  while the permit is active; each download is audited.
* :meth:`close_for_permit` rejects every open request of a permit that is no longer active; the
  router subscribes it to the permit event stream and runs :meth:`close_ended` at start.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from permits.policy import check_see
from permits.service import get_terms
from permits.terms import PermitStatus, PermitTerms
from spe.airlock import checks as chk
from spe.airlock import contributions, mia_job, models_check
from spe.airlock.acro_evidence import AcroResults
from spe.airlock.acro_evidence import parse as parse_acro
from spe.airlock.kinds import TABLE_KINDS
from spe.airlock.models import ExportFile, ExportRelease, ExportRequest, ExportVote
from spe.airlock.states import OPEN, State, check
from spe.airlock.storage import Quarantine, Staged
from spe.audit import AuditAction, AuditEvent, Outcome, record
from spe.auth.principal import SYSTEM, Principal, Role
from spe.config import Settings
from spe.db import Database
from spe.db.base import utcnow
from spe.errors import Conflict, Forbidden, InvalidInput, NotFound, PayloadTooLarge

logger = logging.getLogger("spe.airlock")

Decision = Literal["approve", "reject", "return"]
#: A queued membership-inference job: request id, file id, model kind, declared rows.
MiaJob = tuple[str, str, str, int | None]
#: Largest file read as a possible ACRO ``results.json``.
ACRO_RESULTS_MAX = 10_000_000


@dataclass(frozen=True)
class Download:
    """A released file, verified against its recorded hash; read it in chunks."""

    name: str
    sha256: str
    size: int
    quarantine: Quarantine
    request_id: str
    file_id: str

    def chunks(self) -> Iterator[bytes]:
        return self.quarantine.chunks(self.request_id, self.file_id)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks())


def _mia_queued(f: ExportFile) -> bool:
    """Whether ``f`` waits for its membership-inference result."""
    return any(c.get("name") == mia_job.NAME and (c.get("details") or {}).get("state") == "queued"
               for c in (f.checks or []))


class AirlockService:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.quarantine = Quarantine(settings.data_dir / "airlock" / "quarantine")
        #: Threads of the membership-inference jobs started by this service.
        self.mia_threads: list[threading.Thread] = []

    # -- authorisation ---------------------------------------------------------------------
    def _terms(self, session: Session, principal: Principal, permit_id: str) -> PermitTerms:
        try:
            terms = get_terms(session, permit_id)
        except NotFound:
            raise NotFound(f"No permit {permit_id} visible to the caller.") from None
        check_see(principal, permit_id, terms.access_body, terms.persons)
        return terms

    @staticmethod
    def _check_researcher(principal: Principal, terms: PermitTerms) -> None:
        if Role.RESEARCHER not in principal.roles or not terms.names(principal.username):
            raise Forbidden("Only researchers named in the permit make export requests.")

    @staticmethod
    def _check_usable(terms: PermitTerms) -> None:
        if not terms.usable:
            raise Conflict(f"The permit is {terms.state_text}: nothing can be exported "
                           "under it.")

    @staticmethod
    def _load(session: Session, permit_id: str, request_id: str, *, lock: bool = False
              ) -> ExportRequest:
        query = select(ExportRequest).where(ExportRequest.id == request_id,
                                            ExportRequest.permit_id == permit_id)
        if lock:
            query = query.with_for_update()
        found = session.execute(query).scalar_one_or_none()
        if found is None:
            raise NotFound(f"No export request {request_id} under permit {permit_id} visible "
                           "to the caller.")
        return found

    def _own(self, session: Session, principal: Principal, permit_id: str, request_id: str
             ) -> tuple[PermitTerms, ExportRequest]:
        terms = self._terms(session, principal, permit_id)
        self._check_researcher(principal, terms)
        req = self._load(session, permit_id, request_id, lock=True)
        if req.requester != principal.username:
            raise Forbidden("Only the researcher who made this export request may change it.")
        return terms, req

    # -- audit -----------------------------------------------------------------------------
    @staticmethod
    def _audit(session: Session, principal: Principal, action: AuditAction, permit_id: str,
               target: str, details: dict[str, Any], outcome: Outcome = Outcome.SUCCESS,
               reason: str | None = None) -> None:
        record(session, AuditEvent(action=action, actor=principal.actor,
                                   role=principal.primary_role(), permit_id=permit_id,
                                   target=target, outcome=outcome, reason=reason,
                                   details=details))

    def _move(self, session: Session, principal: Principal, req: ExportRequest, to: State,
              reason: str | None = None) -> None:
        current = State(req.state)
        check(current, to)
        req.state = to.value
        req.updated_at = utcnow()
        if reason is not None:
            req.reason = reason
        self._audit(session, principal, AuditAction.AIRLOCK_TRANSITION, req.permit_id, req.id,
                    {"from": current.value, "to": to.value, "round": req.round},
                    reason=reason)

    # -- researcher ------------------------------------------------------------------------
    def create(self, principal: Principal, permit_id: str, justification: str,
               receipts: list[dict[str, Any]]) -> dict[str, Any]:
        with self.db.write() as s:
            terms = self._terms(s, principal, permit_id)
            self._check_researcher(principal, terms)
            self._check_usable(terms)
            req = ExportRequest(id=uuid.uuid4().hex, permit_id=permit_id,
                                requester=principal.username, justification=justification,
                                state=State.DRAFT.value, round=0,
                                reviewers_required=terms.export.reviewers, receipts=receipts)
            s.add(req)
            s.flush()
            self._audit(s, principal, AuditAction.AIRLOCK_CREATE, permit_id, req.id,
                        {"receipts": len(receipts), "workspace": principal.workspace_id})
            return self._view(s, principal, req)

    def _limits(self, terms: PermitTerms) -> tuple[int, int, int]:
        e = terms.export
        return (e.max_files or self.settings.airlock_max_files,
                e.max_bytes or self.settings.airlock_max_bytes,
                e.max_rows or self.settings.airlock_max_rows)

    def _room(self, terms: PermitTerms, req: ExportRequest, files: list[ExportFile]) -> int:
        """Bytes one more file of ``req`` may hold; raises when it can take no file."""
        self._check_usable(terms)
        check(State(req.state), State.SUBMITTED)  # only a draft takes files
        max_files, max_bytes, _rows = self._limits(terms)
        if len(files) >= max_files:
            raise Conflict(f"This request already has {len(files)} files, the most the "
                           f"permit allows ({max_files}). Submit it and open another.")
        room = min(self.settings.airlock_max_file_bytes,
                   max_bytes - sum(f.size for f in files))
        if room <= 0:
            raise PayloadTooLarge(f"The request's files already hold the {max_bytes} bytes "
                                  "the permit allows.")
        return room

    def upload_limit(self, principal: Principal, permit_id: str, request_id: str) -> int:
        """Authorise an upload before its bytes arrive: the most bytes the file may hold
        (``airlock_max_file_bytes`` and what the request's byte limit leaves)."""
        with self.db.write() as s:
            terms, req = self._own(s, principal, permit_id, request_id)
            return self._room(terms, req, self._files(s, req.id))

    def stage(self, request_id: str, limit: int) -> Staged:
        """A quarantine file for an upload of at most ``limit`` bytes (call
        :meth:`upload_limit` first); :meth:`record_upload` or ``discard`` it."""
        return self.quarantine.stage(request_id, uuid.uuid4().hex, limit)

    def record_upload(self, principal: Principal, permit_id: str, request_id: str, name: str,
                      staged: Staged) -> dict[str, Any]:
        """Record a fully staged file (limits checked again under the request's lock) with
        its audit entry; the file takes its final name only after the commit. The caller
        discards ``staged`` if this raises."""
        file_id = staged.final.name
        with self.db.write() as s:
            terms, req = self._own(s, principal, permit_id, request_id)
            room = self._room(terms, req, self._files(s, req.id))
            if staged.size > room:
                raise PayloadTooLarge(f"The file holds more than the {room} bytes this "
                                      "request can still take.")
            if not staged.size:
                raise Conflict("The file is empty.")
            staged.seal()
            row = ExportFile(id=file_id, request_id=req.id, name=name, sha256=staged.sha256,
                             size=staged.size)
            s.add(row)
            req.updated_at = utcnow()
            s.flush()
            self._audit(s, principal, AuditAction.AIRLOCK_UPLOAD, permit_id, req.id,
                        {"file_id": file_id, "name": name, "sha256": staged.sha256,
                         "size": staged.size, "workspace": principal.workspace_id})
            view = _file_view(row)
        staged.publish()
        return view

    def upload(self, principal: Principal, permit_id: str, request_id: str, name: str,
               data: bytes) -> dict[str, Any]:
        """:meth:`upload_limit`, :meth:`stage` and :meth:`record_upload` for bytes in hand."""
        limit = self.upload_limit(principal, permit_id, request_id)
        if len(data) > limit:
            raise PayloadTooLarge(f"The file holds more than the {limit} bytes this request "
                                  "can still take.")
        staged = self.stage(request_id, limit)
        try:
            staged.write(data)
            return self.record_upload(principal, permit_id, request_id, name, staged)
        finally:
            staged.discard()  # a no-op once published

    def sweep_quarantine(self) -> tuple[int, int]:
        """Finish uploads a crash interrupted (see :meth:`Quarantine.sweep`)."""
        with self.db.read() as s:
            known = {(r, f) for r, f in s.execute(
                select(ExportFile.request_id, ExportFile.id))}
        published, deleted = self.quarantine.sweep(lambda r, f: (r, f) in known)
        if published or deleted:
            logger.info("quarantine swept", extra={"fields": {"published": published,
                                                              "deleted": deleted}})
        return published, deleted

    def remove_file(self, principal: Principal, permit_id: str, request_id: str,
                    file_id: str) -> None:
        with self.db.write() as s:
            _terms, req = self._own(s, principal, permit_id, request_id)
            if req.state != State.DRAFT.value:
                raise Conflict(f"Files of a {req.state} request cannot change.")
            row = s.get(ExportFile, file_id)
            if row is None or row.request_id != req.id:
                raise NotFound(f"No file {file_id} in this request.")
            s.delete(row)
            self._audit(s, principal, AuditAction.AIRLOCK_REMOVE_FILE, permit_id, req.id,
                        {"file_id": file_id, "sha256": row.sha256})
        self.quarantine.remove(request_id, file_id)

    def submit(self, principal: Principal, permit_id: str, request_id: str) -> dict[str, Any]:
        with self.db.write() as s:
            terms, req = self._own(s, principal, permit_id, request_id)
            if terms.frozen:  # an incident freeze refuses every step and keeps the request
                self._check_usable(terms)
            files = self._files(s, req.id)
            if not files:
                raise Conflict("Add at least one file before submitting.")
            req.round += 1
            self._move(s, principal, req, State.SUBMITTED)
            self._audit(s, principal, AuditAction.AIRLOCK_SUBMIT, permit_id, req.id,
                        {"round": req.round, "files": [
                            {"file_id": f.id, "sha256": f.sha256, "size": f.size}
                            for f in files]})
            if not terms.usable:
                self._move(s, SYSTEM, req, State.REJECTED,
                           f"The permit is {terms.status.value}.")
                return self._view(s, principal, req)
            jobs: list[MiaJob] = []
            verdicts = self._run_checks(s, terms, req, files, jobs)
            self._move(s, SYSTEM, req, State.CHECKED)
            if any(v.blocked for v in verdicts):
                self._move(s, SYSTEM, req, State.RETURNED_FOR_CHANGES,
                           "A blocking check failed: see each file's checks.")
            elif all(v.outcome == chk.PASS for v in verdicts):
                self._move(s, SYSTEM, req, State.RELEASED,
                           "Every file is covered by a DP release receipt of this permit.")
                self._release(s, req, files)
            else:
                self._move(s, SYSTEM, req, State.IN_REVIEW)
            view = self._view(s, principal, req)
        self._start_mia_jobs(jobs)
        return view

    def _start_mia_jobs(self, jobs: list[MiaJob]) -> None:
        """Start the membership-inference jobs the checks queued (after their commit)."""
        for request_id, file_id, kind, rows in jobs:
            def record(found: chk.Check, request_id: str = request_id,
                       file_id: str = file_id) -> None:
                self.record_mia(request_id, file_id, found)

            self.mia_threads.append(mia_job.start(
                self.settings, self.quarantine.path(request_id, file_id), kind, rows, record))

    def resume_mia_jobs(self) -> int:
        """Start again the membership-inference jobs of files in review whose result never
        came (the process that ran them stopped): approving such a file waits for it. Without
        a configured SACRO-ML environment now, the file gets the "not run" check instead.
        Returns the number of files seen. A job still running in another worker runs twice;
        the later result replaces the earlier one."""
        jobs: list[MiaJob] = []
        waiting: list[tuple[str, str]] = []
        with self.db.read() as s:
            found = s.execute(select(ExportFile, ExportRequest).join(
                ExportRequest, ExportRequest.id == ExportFile.request_id).where(
                ExportRequest.state == State.IN_REVIEW.value)).all()
            for f, req in found:
                if not _mia_queued(f):
                    continue
                waiting.append((req.id, f.id))
                if mia_job.configured(self.settings) is None:
                    continue
                try:
                    data = self.quarantine.get(req.id, f.id)
                except OSError:
                    continue
                model = models_check.model_kind(f.kind or "", data)
                rows = models_check.declared_rows(list(req.receipts or [])).get(f.name)
                if model is not None:
                    jobs.append((req.id, f.id, model, rows))
        started = {(r, f) for r, f, _k, _n in jobs}
        for request_id, file_id in waiting:
            if (request_id, file_id) not in started:  # nothing can run it: say so
                self.record_mia(request_id, file_id, mia_job.not_run(
                    self.settings, "the job was lost when the SPE stopped"))
        self._start_mia_jobs(jobs)
        return len(waiting)

    def record_mia(self, request_id: str, file_id: str, found: chk.Check) -> None:
        """Store a membership-inference result on its file (replacing the queued check),
        audited as ``airlock.mia``. The file's outcome never becomes ``pass`` by it."""
        with self.db.write() as s:
            row = s.get(ExportFile, file_id)
            req = s.get(ExportRequest, request_id)
            if row is None or req is None or row.request_id != request_id:
                return
            row.checks = [c for c in (row.checks or []) if c.get("name") != mia_job.NAME] + [
                found.as_dict()]
            if found.outcome == chk.FAIL and row.outcome != chk.FAIL:
                row.outcome = chk.REVIEW  # reviewers see the failed attack; never released
            self._audit(s, SYSTEM, AuditAction.AIRLOCK_MIA, req.permit_id, request_id,
                        {"file_id": file_id, "sha256": row.sha256, "outcome": found.outcome,
                         "state": found.details.get("state")})

    def _run_checks(self, s: Session, terms: PermitTerms, req: ExportRequest,
                    files: list[ExportFile], jobs: list[MiaJob] | None = None
                    ) -> list[chk.FileVerdict]:
        _files, _bytes, max_rows = self._limits(terms)
        released = s.execute(select(ExportRelease).where(
            ExportRelease.permit_id == terms.permit_id)).scalars().all()
        tables = []
        for rel in released:
            if rel.kind in ("csv", "tsv", "parquet", "xlsx"):
                try:
                    data = self.quarantine.get(rel.request_id, rel.file_id)
                    for sheet, table in chk.read_tables(data, rel.kind, self.quarantine.path(
                            rel.request_id, rel.file_id)).items():
                        tables.append(chk.ReleasedTable(
                            rel.request_id, rel.file_id + (f" sheet {sheet}" if sheet else ""),
                            table.to_pandas()))
                except (OSError, ValueError):
                    logger.warning("released table unreadable for differencing",
                                   extra={"fields": {"file_id": rel.file_id}})
        ctx = chk.Context(permit_id=terms.permit_id,
                          secret=self.settings.secret_key.get_secret_value(),
                          allowed_kinds=frozenset(terms.export.allowed_kinds),
                          min_cell_count=terms.export.min_cell_count, max_rows=max_rows,
                          receipts=list(req.receipts or []),
                          released_hashes=frozenset(r.sha256 for r in released),
                          released_tables=tables)
        verdicts = []
        acro = self._acro_results(req, files)
        queries = contributions.query_evidence(list(req.receipts or []))
        model_rows = models_check.declared_rows(list(req.receipts or []))
        for f in files:
            data = self.quarantine.get(req.id, f.id)
            if chk.sha256(data) != f.sha256:  # quarantine changed under us: never pass
                verdict = chk.FileVerdict("unknown", chk.FAIL, (chk.Check(
                    "integrity", chk.FAIL, "The quarantined bytes no longer match the hash "
                    "recorded at upload; an operator must investigate.", blocking=True),))
            else:
                verdict = chk.check_file(data, ctx, self.quarantine.path(req.id, f.id))
                verdict = _with_acro(verdict, f, files, acro)
                if f.name in queries and verdict.kind in TABLE_KINDS and not verdict.blocked:
                    verdict = contributions.apply(verdict, contributions.file_checks(
                        data, verdict.kind, self.quarantine.path(req.id, f.id),
                        queries[f.name], terms, self.db, self.settings))
                model = models_check.model_kind(verdict.kind, data)
                if model is not None and not verdict.blocked:
                    verdict = contributions.apply(verdict, [
                        *models_check.structural_checks(data, model, model_rows.get(f.name)),
                        mia_job.initial_check(self.settings)])
                    if jobs is not None and mia_job.configured(self.settings) is not None:
                        jobs.append((req.id, f.id, model, model_rows.get(f.name)))
            f.kind, f.outcome = verdict.kind, verdict.outcome
            f.checks = [c.as_dict() for c in verdict.checks]
            verdicts.append(verdict)
            self._audit(s, SYSTEM, AuditAction.AIRLOCK_CHECK, req.permit_id, req.id,
                        {"file_id": f.id, "sha256": f.sha256, "kind": verdict.kind,
                         "outcome": verdict.outcome, "round": req.round,
                         "checks": {c.name: c.outcome for c in verdict.checks}})
        return verdicts

    def _acro_results(self, req: ExportRequest, files: list[ExportFile]
                      ) -> dict[str, AcroResults]:
        """The request's ACRO ``results.json`` files (file id -> parsed), if any."""
        found: dict[str, AcroResults] = {}
        for f in files:
            if f.size > ACRO_RESULTS_MAX:
                continue
            data = self.quarantine.get(req.id, f.id)
            if data.lstrip()[:1] == b"{" and chk.sha256(data) == f.sha256:
                parsed = parse_acro(data)
                if parsed is not None:
                    found[f.id] = parsed
        return found

    def _release(self, s: Session, req: ExportRequest, files: list[ExportFile]) -> None:
        for f in files:
            s.add(ExportRelease(permit_id=req.permit_id, request_id=req.id, file_id=f.id,
                                sha256=f.sha256, kind=f.kind))
            self._audit(s, SYSTEM, AuditAction.AIRLOCK_RELEASE, req.permit_id, req.id,
                        {"file_id": f.id, "sha256": f.sha256, "kind": f.kind})

    def withdraw(self, principal: Principal, permit_id: str, request_id: str
                 ) -> dict[str, Any]:
        with self.db.write() as s:
            terms, req = self._own(s, principal, permit_id, request_id)
            if terms.frozen:  # kept as it is for evidence
                self._check_usable(terms)
            self._move(s, principal, req, State.WITHDRAWN, "Withdrawn by the researcher.")
            self._audit(s, principal, AuditAction.AIRLOCK_WITHDRAW, permit_id, req.id, {})
            return self._view(s, principal, req)

    def revise(self, principal: Principal, permit_id: str, request_id: str) -> dict[str, Any]:
        with self.db.write() as s:
            terms, req = self._own(s, principal, permit_id, request_id)
            self._check_usable(terms)
            self._move(s, principal, req, State.DRAFT)
            self._audit(s, principal, AuditAction.AIRLOCK_REVISE, permit_id, req.id,
                        {"round": req.round})
            return self._view(s, principal, req)

    # -- reviewers -------------------------------------------------------------------------
    def vote(self, principal: Principal, permit_id: str, request_id: str, decision: Decision,
             comment: str | None, shared: bool, override_reason: str | None,
             files: dict[str, Decision] | None = None) -> dict[str, Any]:
        """One reviewer's vote: ``decision`` for every file, except those ``files`` names."""
        with self.db.write() as s:
            terms = self._terms(s, principal, permit_id)
            if Role.HOSPITAL_ADMIN not in principal.roles or principal.kind != "user":
                raise Forbidden("Only hospital admins (with their own login) review exports.")
            req = self._load(s, permit_id, request_id, lock=True)
            if req.requester == principal.username:
                raise Forbidden("You made this export request: reviewers must be other people.")
            if req.state != State.IN_REVIEW.value:
                raise Conflict(f"This request is {req.state}, not in review.")
            self._check_usable(terms)
            votes = self._votes(s, req)
            if any(v.reviewer == principal.username for v in votes):
                raise Conflict("You have already voted on this request.")
            rows = self._files(s, req.id)
            unknown = sorted(set(files or {}) - {f.id for f in rows})
            if unknown:
                raise InvalidInput("The vote names files that are not in this request.",
                                   errors=[{"loc": ["body", "files"],
                                            "msg": f"{len(unknown)} unknown file ids"}])
            per_file = {f.id: (files or {}).get(f.id, decision) for f in rows}
            for f in rows:
                if per_file[f.id] == "approve" and _mia_queued(f):
                    raise Conflict(f"The membership-inference attack on file {f.id} has not "
                                   "finished: approving it waits for the result (rejecting "
                                   "or returning the request does not).")
                failed = f.outcome == chk.FAIL or any(c["outcome"] == chk.FAIL
                                                      for c in f.checks)
                if per_file[f.id] == "approve" and failed and not override_reason:
                    raise Conflict(f"A check failed on file {f.id}: approving it needs a "
                                   "written override_reason.")
                if per_file[f.id] == "reject" and f.outcome == chk.PASS and not override_reason:
                    raise Conflict(f"Every check passed on file {f.id}: rejecting it needs a "
                                   "written override_reason.")
            s.add(ExportVote(request_id=req.id, round=req.round, reviewer=principal.username,
                             decision=decision, comment=comment, shared=shared,
                             override_reason=override_reason,
                             files=per_file if files else None))
            s.flush()
            self._audit(s, principal, AuditAction.AIRLOCK_VOTE, permit_id, req.id,
                        {"decision": decision, "round": req.round, "shared": shared,
                         "override": bool(override_reason), "files": per_file})
            files_ = rows
            votes = self._votes(s, req)
            if len(votes) >= req.reviewers_required:
                self._decide(s, req, files_, votes)
            return self._view(s, principal, req)

    def _decide(self, s: Session, req: ExportRequest, files: list[ExportFile],
                votes: list[ExportVote]) -> None:
        """Consolidate: a file is released only when every vote approves it; any request for
        changes returns the request; otherwise the approved files are released (the others
        are not) or, when none is approved, the request is rejected."""
        def said(v: ExportVote, file_id: str) -> str:
            return (v.files or {}).get(file_id, v.decision)

        per_file = {f.id: {said(v, f.id) for v in votes} for f in files}
        approved = [f for f in files if per_file[f.id] == {"approve"}]
        if any("return" in d for d in per_file.values()):
            self._move(s, SYSTEM, req, State.RETURNED_FOR_CHANGES,
                       "A reviewer asked for changes.")
        elif approved:
            held = len(files) - len(approved)
            self._move(s, SYSTEM, req, State.APPROVED,
                       f"Approved by {len(votes)} independent reviewers"
                       + (f"; {held} files rejected and not released." if held else "."))
            self._move(s, SYSTEM, req, State.RELEASED)
            self._release(s, req, approved)
        else:
            self._move(s, SYSTEM, req, State.REJECTED, "Rejected by the reviewers.")

    # -- reading ---------------------------------------------------------------------------
    def _close_if_ended(self, principal: Principal, permit_id: str) -> None:
        """A permit changed by another process (whose event this one did not see) still
        closes its open requests before anyone reads them."""
        with self.db.read() as s:
            terms = self._terms(s, principal, permit_id)
        if terms.status not in (PermitStatus.ACTIVE, PermitStatus.PENDING):
            self.close_for_permit(permit_id)

    def list_requests(self, principal: Principal, permit_id: str) -> list[dict[str, Any]]:
        self._close_if_ended(principal, permit_id)
        with self.db.write() as s:
            self._terms(s, principal, permit_id)
            rows = s.execute(select(ExportRequest).where(ExportRequest.permit_id == permit_id)
                             .order_by(ExportRequest.created_at)).scalars().all()
            self._audit(s, principal, AuditAction.AIRLOCK_LIST, permit_id, permit_id,
                        {"count": len(rows)})
            return [self._view(s, principal, r) for r in rows]

    def get(self, principal: Principal, permit_id: str, request_id: str) -> dict[str, Any]:
        self._close_if_ended(principal, permit_id)
        with self.db.write() as s:
            self._terms(s, principal, permit_id)
            req = self._load(s, permit_id, request_id)
            self._audit(s, principal, AuditAction.AIRLOCK_READ, permit_id, req.id, {})
            return self._view(s, principal, req)

    def download(self, principal: Principal, permit_id: str, request_id: str,
                 file_id: str) -> Download:
        with self.db.write() as s:
            terms = self._terms(s, principal, permit_id)
            if (Role.RESEARCHER not in principal.roles or principal.kind != "user"
                    or not terms.names(principal.username)):
                raise Forbidden("Released files are downloaded only by the persons the permit "
                                "names, with their own login (not a workspace token).")
            self._check_usable(terms)
            req = self._load(s, permit_id, request_id)
            row = s.get(ExportFile, file_id)
            if row is None or row.request_id != req.id:
                raise NotFound(f"No file {file_id} in this request.")
            released = s.execute(select(ExportRelease).where(
                ExportRelease.file_id == file_id)).scalar_one_or_none()
            if req.state != State.RELEASED.value:
                raise Conflict(f"This request is {req.state}: only released files can be "
                               "downloaded.")
            if released is None:
                raise Conflict("The reviewers did not approve this file; it was not released.")
            if self.quarantine.digest(req.id, row.id) != row.sha256:
                raise Conflict("The file no longer matches its recorded hash; it is withheld.")
            self._audit(s, principal, AuditAction.AIRLOCK_DOWNLOAD, permit_id, req.id,
                        {"file_id": row.id, "sha256": row.sha256, "size": row.size})
            return Download(row.name, row.sha256, row.size, self.quarantine, req.id, row.id)

    # -- permit events ---------------------------------------------------------------------
    def close_for_permit(self, permit_id: str) -> int:
        """Reject the open requests of ``permit_id`` when the permit is no longer active."""
        with self.db.write() as s:
            try:
                terms = get_terms(s, permit_id)
            except NotFound:
                return 0
            if terms.status in (PermitStatus.ACTIVE, PermitStatus.PENDING):
                return 0
            rows = s.execute(select(ExportRequest).where(
                ExportRequest.permit_id == permit_id,
                ExportRequest.state.in_([st.value for st in OPEN]))
                .with_for_update()).scalars().all()
            why = f"The permit was {terms.status.value}; open export requests are closed."
            for req in rows:
                self._force_reject(s, req, why)
            if rows:
                self._audit(s, SYSTEM, AuditAction.AIRLOCK_CLOSE, permit_id, permit_id,
                            {"requests": [r.id for r in rows], "status": terms.status.value})
            return len(rows)

    def _force_reject(self, s: Session, req: ExportRequest, why: str) -> None:
        current = State(req.state)
        if current is State.DRAFT or current is State.RETURNED_FOR_CHANGES:
            # The researcher's own states: closed without review, as the permit ended.
            req.state = State.REJECTED.value
            req.reason = why
            self._audit(s, SYSTEM, AuditAction.AIRLOCK_TRANSITION, req.permit_id, req.id,
                        {"from": current.value, "to": State.REJECTED.value,
                         "round": req.round}, reason=why)
            return
        self._move(s, SYSTEM, req, State.REJECTED, why)

    def close_ended(self) -> int:
        """Close open requests of every permit that is no longer active (run at start)."""
        with self.db.read() as s:
            permits = sorted(set(s.execute(select(ExportRequest.permit_id).where(
                ExportRequest.state.in_([st.value for st in OPEN]))).scalars()))
        return sum(self.close_for_permit(p) for p in permits)

    # -- retention -------------------------------------------------------------------------
    def withdraw_stale_drafts(self, now: datetime | None = None) -> int:
        """Withdraw drafts unchanged for ``airlock_draft_days`` (each an audited
        ``airlock.transition`` whose reason the researcher sees); their bytes then fall under
        the retention below. Returns how many were withdrawn."""
        days = self.settings.airlock_draft_days
        cutoff = (now or utcnow()) - timedelta(days=days)
        with self.db.write() as s:
            rows = s.execute(select(ExportRequest).where(
                ExportRequest.state == State.DRAFT.value, ExportRequest.updated_at < cutoff)
                .order_by(ExportRequest.updated_at)).scalars().all()
            for req in rows:
                self._move(s, SYSTEM, req, State.WITHDRAWN,
                           f"Withdrawn automatically: the draft was not changed for {days:g} "
                           "days. Open a new request to export these files.")
                req.updated_at = now or req.updated_at  # retention counts from this instant
            return len(rows)

    def purge_ended_permits(self, now: datetime | None = None) -> int:
        """Delete every quarantined file, released ones included, of permits that ended
        (revoked, or expired at ``valid_until``) more than the permit's ``retention_days``
        ago (EHDS Art 68: data leave the SPE within 6 months of the permit's end). Audited
        per request (``airlock.purge``, reason ``permit_ended``, each file's id, hash and size)
        before the bytes go; rows and hashes stay. Differencing needs released cells only
        for new exports, which an ended permit can no longer make. Returns files deleted."""
        from permits.models import Permit

        now = now or utcnow()
        doomed: list[tuple[str, str]] = []
        with self.db.write() as s:
            permit_ids = set(s.execute(select(ExportRequest.permit_id).distinct()).scalars())
            for permit_id in sorted(permit_ids):
                terms = get_terms(s, permit_id, now)
                if terms.status not in (PermitStatus.REVOKED, PermitStatus.EXPIRED):
                    continue
                ended = terms.valid_until
                if terms.status is PermitStatus.REVOKED:
                    row = s.execute(select(Permit).where(Permit.id == permit_id)).scalar_one()
                    ended = min(ended, row.updated_at)
                if ended + timedelta(days=terms.retention_days) > now:
                    continue
                for req in s.execute(select(ExportRequest).where(
                        ExportRequest.permit_id == permit_id)).scalars():
                    files = [f for f in self._files(s, req.id)
                             if self.quarantine.exists(req.id, f.id)]
                    if not files:
                        continue
                    self._audit(s, SYSTEM, AuditAction.AIRLOCK_PURGE, permit_id, req.id,
                                {"reason": "permit_ended", "permit_status": terms.status.value,
                                 "ended_at": ended.isoformat(),
                                 "retention_days": terms.retention_days, "state": req.state,
                                 "files": [{"file_id": f.id, "sha256": f.sha256,
                                            "size": f.size} for f in files]})
                    doomed.extend((req.id, f.id) for f in files)
        for request_id, file_id in doomed:
            self.quarantine.remove(request_id, file_id)
        for request_id in {r for r, _ in doomed}:
            self.quarantine.prune(request_id)
        return len(doomed)

    def purge_expired(self, now: datetime | None = None) -> int:
        """Withdraw stale drafts (:meth:`withdraw_stale_drafts`), delete the files of ended
        permits (:meth:`purge_ended_permits`), then delete the quarantined bytes of files that
        were not released, once their request (rejected, withdrawn, closed, or released
        without them) has not changed for ``airlock_retention_days``. Each request's deletion
        is audited (``airlock.purge``, every file's id, hash and size) and committed before
        the bytes go; rows, hashes and released files of live permits stay (the ledger).
        Returns the number of files deleted."""
        self.withdraw_stale_drafts(now)
        ended = self.purge_ended_permits(now)
        cutoff = (now or utcnow()) - timedelta(days=self.settings.airlock_retention_days)
        finished = [State.REJECTED.value, State.WITHDRAWN.value, State.RELEASED.value]
        doomed: list[tuple[str, str]] = []
        with self.db.write() as s:
            rows = s.execute(select(ExportRequest).where(
                ExportRequest.state.in_(finished), ExportRequest.updated_at < cutoff)
                .order_by(ExportRequest.updated_at)).scalars().all()
            for req in rows:
                released = set(s.execute(select(ExportRelease.file_id).where(
                    ExportRelease.request_id == req.id)).scalars())
                files = [f for f in self._files(s, req.id)
                         if f.id not in released and self.quarantine.exists(req.id, f.id)]
                if not files:
                    continue
                self._audit(s, SYSTEM, AuditAction.AIRLOCK_PURGE, req.permit_id, req.id,
                            {"state": req.state, "retention_days":
                             self.settings.airlock_retention_days,
                             "files": [{"file_id": f.id, "sha256": f.sha256, "size": f.size}
                                       for f in files]})
                doomed.extend((req.id, f.id) for f in files)
        for request_id, file_id in doomed:
            self.quarantine.remove(request_id, file_id)
        for request_id in {r for r, _ in doomed}:
            self.quarantine.prune(request_id)
        return ended + len(doomed)

    # -- views -----------------------------------------------------------------------------
    @staticmethod
    def _files(s: Session, request_id: str) -> list[ExportFile]:
        return list(s.execute(select(ExportFile).where(ExportFile.request_id == request_id)
                              .order_by(ExportFile.created_at, ExportFile.id)).scalars())

    @staticmethod
    def _votes(s: Session, req: ExportRequest) -> list[ExportVote]:
        return list(s.execute(select(ExportVote).where(
            ExportVote.request_id == req.id, ExportVote.round == req.round)
            .order_by(ExportVote.id)).scalars())

    def _view(self, s: Session, principal: Principal, req: ExportRequest) -> dict[str, Any]:
        files = self._files(s, req.id)
        votes = self._votes(s, req)
        is_reviewer = Role.HOSPITAL_ADMIN in principal.roles and principal.kind == "user" \
            and principal.username != req.requester
        decided = req.state not in (State.IN_REVIEW.value,)
        voted = any(v.reviewer == principal.username for v in votes)
        shown: list[dict[str, Any]] = []
        if is_reviewer and (voted or decided):
            shown = [_vote_view(v, private=True) for v in votes]
        elif is_reviewer:
            shown = []  # votes stay hidden until this reviewer has voted
        elif decided:
            shown = [_vote_view(v, private=False) for v in votes if v.shared]
        return {
            "id": req.id, "permit_id": req.permit_id, "requester": req.requester,
            "justification": req.justification, "state": req.state, "round": req.round,
            "reason": req.reason, "reviewers_required": req.reviewers_required,
            "votes_received": len(votes), "you_voted": voted,
            "created_at": req.created_at.isoformat(), "updated_at": req.updated_at.isoformat(),
            "files": [_file_view(f) for f in files], "votes": shown,
        }


def _with_acro(verdict: chk.FileVerdict, f: ExportFile, files: list[ExportFile],
               acro: dict[str, AcroResults]) -> chk.FileVerdict:
    """Add the researcher's ACRO evidence to a file's checks; the verdict stays ours."""
    extra: list[chk.Check] = []
    for results_id, results in acro.items():
        if f.id == results_id:
            missing = results.missing({g.name for g in files})
            extra.append(chk.Check(
                "acro_bundle", chk.REVIEW if missing else chk.PASS,
                f"ACRO's results.json names {len(results.by_file)} files; "
                + (f"{len(missing)} are not in this request: {', '.join(missing[:10])}."
                   if missing else "all are in this request."),
                details={"files": sorted(results.by_file)[:200], "missing": missing[:200]}))
        else:
            evidence = results.evidence(f.name)
            if evidence is not None:
                extra.append(evidence)
    if not extra:
        return verdict
    return chk.FileVerdict(verdict.kind, verdict.outcome, verdict.checks + tuple(extra))


def _file_view(f: ExportFile) -> dict[str, Any]:
    return {"id": f.id, "name": f.name, "sha256": f.sha256, "size": f.size, "kind": f.kind,
            "outcome": f.outcome, "checks": list(f.checks or [])}


def _vote_view(v: ExportVote, *, private: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"decision": v.decision, "comment": v.comment,
                           "created_at": v.created_at.isoformat()}
    if private:
        out.update(reviewer=v.reviewer, shared=v.shared, override_reason=v.override_reason,
                   files=v.files)
    return out
