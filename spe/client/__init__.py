"""Notebook client for DP queries from a workspace.

Usage::

    import spe.client
    spe = spe.client.connect()          # reads SPE_API_URL, SPE_TOKEN, SPE_PERMIT_ID
    df = spe.sql("SELECT gender_concept_id, COUNT(*) FROM person GROUP BY 1", epsilon=0.5)
    df.attrs["accuracy"], df.attrs["cost"], df.attrs["receipt"]
    spe.cost("SELECT COUNT(*) FROM measurement")   # dry run: free
    spe.budget()                                   # spent / remaining, plot when possible

Environment variables: ``SPE_API_URL`` (the SPE API base URL), ``SPE_TOKEN`` (the workspace
token; never printed), ``SPE_TOKEN_FILE`` (where the hub keeps the newest token of a running
workspace: read on every request, so tokens never expire under a working notebook) and
``SPE_PERMIT_ID`` (the permit the workspace is bound to). Errors are
raised as :class:`SPEClientError` carrying the server's problem details.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

ENV_URL, ENV_TOKEN, ENV_PERMIT = "SPE_API_URL", "SPE_TOKEN", "SPE_PERMIT_ID"
ENV_TOKEN_FILE = "SPE_TOKEN_FILE"  # noqa: S105 - a variable name
#: How often a request refused with 429 (a rate or concurrency limit) is retried.
RETRY_429 = 3


class SPEClientError(Exception):
    """A problem reported by the SPE API (``problem`` holds the RFC 9457 body)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(f"{problem.get('title', 'Error')} ({status}): "
                         f"{problem.get('detail', '')}")


@dataclass
class Budget:
    data: dict[str, Any]

    def __repr__(self) -> str:
        d = self.data
        return (f"Budget(permit={d['permit_id']}, epsilon spent {d['epsilon_spent']:.4g} of "
                f"{d['epsilon_total']:.4g} (remaining {d['epsilon_remaining']:.4g}), delta "
                f"spent {d['delta_spent']:.3g} of {d['delta_total']:.3g}, queries "
                f"{d['queries']})")

    def plot(self) -> Any:
        """A small bar of spent vs remaining epsilon (None when matplotlib is missing)."""
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, ax = plt.subplots(figsize=(5, 0.8))
        ax.barh([0], [self.data["epsilon_spent"]], color="tab:red", label="spent")
        ax.barh([0], [self.data["epsilon_remaining"]], left=[self.data["epsilon_spent"]],
                color="tab:green", label="remaining")
        ax.set_yticks([])
        ax.set_xlabel("epsilon")
        ax.legend(loc="upper right", fontsize="small")
        return fig


def to_frame(answer: dict[str, Any]) -> pd.DataFrame:
    """The released table as a DataFrame with accuracy, cost and receipt in ``.attrs``."""
    df = pd.DataFrame(answer["rows"], columns=answer["columns"])
    for key in ("accuracy", "cost", "receipt", "budget", "plan", "charge_id", "cells"):
        df.attrs[key] = answer.get(key)
    df.attrs["csv"] = answer.get("csv")
    df.attrs["parquet_b64"] = answer.get("parquet_b64")
    return df


def describe(df: pd.DataFrame) -> str:
    """A readable summary of a DP result: table, per-column accuracy, cost."""
    lines = [df.to_string(index=False), ""]
    for col, acc in (df.attrs.get("accuracy") or {}).items():
        hw = acc.get("ci95_halfwidth")
        extra = f", 95% CI ±{hw:.4g}" if isinstance(hw, int | float) else ""
        lines.append(f"  {col}: {acc.get('mechanism')}{extra}")
    cost = df.attrs.get("cost") or {}
    if cost:
        lines.append(f"cost: epsilon {cost.get('epsilon', 0):.4g}, delta "
                     f"{cost.get('delta', 0):.3g}")
    return "\n".join(lines)


def save_release(df: pd.DataFrame, path: str | Path, kind: str = "csv") -> Path:
    """Write the exact released bytes (what the receipt signs) for an export request."""
    target = Path(path)
    if kind == "csv":
        target.write_text(df.attrs["csv"])
    else:
        target.write_bytes(base64.b64decode(df.attrs["parquet_b64"]))
    return target


class WorkspaceTokenAuth(httpx.Auth):
    """Bearer auth with the newest workspace token: ``token_file`` is read on every request
    (the hub replaces it with a fresh token while the workspace runs), ``token`` is the
    fallback when the file is missing or empty."""

    def __init__(self, token: str, token_file: str | Path | None = None) -> None:
        self._token = token
        self._file = Path(token_file) if token_file else None

    def current(self) -> str:
        if self._file is not None:
            try:
                fresh = self._file.read_text().strip()
            except OSError:
                fresh = ""
            if fresh:
                return fresh
        return self._token

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers["Authorization"] = f"Bearer {self.current()}"
        yield request


class Client:
    def __init__(self, url: str, token: str, permit_id: str,
                 transport: httpx.BaseTransport | None = None, timeout: float = 120.0,
                 token_file: str | Path | None = None) -> None:
        self.permit_id = permit_id
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout,
                                  auth=WorkspaceTokenAuth(token, token_file),
                                  transport=transport)

    def __repr__(self) -> str:
        return f"spe.client.Client(permit={self.permit_id!r})"

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request; a 429 (rate or concurrency limit) is retried after the server's
        ``Retry-After`` (at most ``RETRY_429`` times, each wait at most 30 s)."""
        for attempt in range(RETRY_429 + 1):
            resp = self._http.request(method, url, **kwargs)
            if resp.status_code != 429 or attempt == RETRY_429:
                return resp
            _wait_retry_after(resp)
        raise RuntimeError("unreachable")

    def _post(self, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": key} if key else {}
        resp = self._send("POST", f"/v1/permits/{self.permit_id}/queries", json=body,
                          headers=headers)
        if resp.status_code >= 400:
            raise SPEClientError(resp.status_code, _problem(resp))
        return resp.json()  # type: ignore[no-any-return]

    def sql(self, query: str, epsilon: float | None = None, *, delta: float | None = None,
            dataset: str | None = None, idempotency_key: str | None = None,
            **options: Any) -> pd.DataFrame:
        """Run a DP query; the answer is replayed (not recharged) if the call is retried."""
        body = {"sql": query, "epsilon": epsilon, "delta": delta, "dataset": dataset,
                **options}
        body = {k: v for k, v in body.items() if v is not None}
        key = idempotency_key or uuid.uuid4().hex
        for attempt in range(2):
            try:
                return to_frame(self._post(body, key))
            except httpx.TransportError:
                if attempt:
                    raise
        raise RuntimeError("unreachable")

    def cost(self, query: str, epsilon: float | None = None, **options: Any) -> dict[str, Any]:
        """Dry run: the cost and remaining budget; spends nothing."""
        body = {"sql": query, "epsilon": epsilon, "dry_run": True, **options}
        return self._post({k: v for k, v in body.items() if v is not None})

    def budget(self, plot: bool = True) -> Budget:
        resp = self._send("GET", f"/v1/permits/{self.permit_id}/budget")
        if resp.status_code >= 400:
            raise SPEClientError(resp.status_code, _problem(resp))
        budget = Budget(resp.json())
        if plot:
            budget.plot()
        return budget

    def _get(self, path: str) -> Any:
        resp = self._send("GET", path)
        if resp.status_code >= 400:
            raise SPEClientError(resp.status_code, _problem(resp))
        return resp.json()

    def permit(self) -> dict[str, Any]:
        """The workspace's permit as the API shows it (terms, datasets and columns, status)."""
        return dict(self._get(f"/v1/permits/{self.permit_id}"))

    def queries(self) -> list[dict[str, Any]]:
        """The permit's recent DP queries as its budget recorded them (time, cost, state),
        newest first."""
        return list(self._get(f"/v1/permits/{self.permit_id}/budget/charges")["items"])

    # -- the airlock -----------------------------------------------------------------------
    def _exports(self, method: str, path: str = "", **kwargs: Any) -> Any:
        resp = self._send(method, f"/v1/permits/{self.permit_id}/exports{path}", **kwargs)
        if resp.status_code >= 400:
            raise SPEClientError(resp.status_code, _problem(resp))
        return resp.json() if resp.content else None

    def export(self, paths: str | Path | list[str | Path], justification: str, *,
               receipts: list[dict[str, Any]] | None = None, submit: bool = True
               ) -> dict[str, Any]:
        """Send files out through the airlock: their bytes go to quarantine, then (with
        ``submit``) the automated checks run. A folder is an ACRO output folder (written by
        ``acro.finalise(folder, "json")``): its ``results.json`` and the files it names are
        sent, and ACRO's checks are shown to the reviewers as your evidence. A file saved with
        :func:`save_release` from a DP answer is released at once when its receipt
        (``df.attrs["receipt"]``) is given; the rest wait for reviewers. Returns the request
        with each file's check results."""
        items = [paths] if isinstance(paths, str | Path) else list(paths)
        files = [f for item in items for f in _export_files(Path(item))]
        request = self._exports("POST", json={"justification": justification,
                                              "receipts": receipts or []})
        for path in files:
            self._upload(request["id"], path)
        if not submit:
            return self._exports("GET", f"/{request['id']}")  # type: ignore[no-any-return]
        return self._exports("POST", f"/{request['id']}/submit")  # type: ignore[no-any-return]

    def _upload(self, request_id: str, path: Path) -> None:
        """Stream one file into quarantine. A streamed body cannot be sent twice, so a 429
        (the server refuses before reading a byte) is retried by reopening the file, after
        ``Retry-After``, at most ``RETRY_429`` times; any other failure raises at once."""
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.name)
        url = f"/v1/permits/{self.permit_id}/exports/{request_id}/files"
        for attempt in range(RETRY_429 + 1):
            with path.open("rb") as fh:  # streamed, never read whole into memory
                resp = self._http.request(
                    "POST", url, params={"name": name.lstrip("._-")[:100] or "file"},
                    content=iter(partial(fh.read, 1 << 20), b""),
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Length": str(path.stat().st_size)})
            if resp.status_code == 429 and attempt < RETRY_429:
                _wait_retry_after(resp)
                continue
            if resp.status_code >= 400:
                raise SPEClientError(resp.status_code, _problem(resp))
            return

    def exports(self) -> list[dict[str, Any]]:
        """This permit's export requests: state, check results, comments shared with you."""
        return list(self._exports("GET")["items"])

    def withdraw(self, export_id: str) -> dict[str, Any]:
        """Withdraw one of your export requests (before it is decided)."""
        return self._exports("POST", f"/{export_id}/withdraw")  # type: ignore[no-any-return]


def _wait_retry_after(resp: httpx.Response) -> None:
    """Sleep the response's ``Retry-After`` seconds (0.1 to 30; 1 when unreadable)."""
    try:
        wait = float(resp.headers.get("Retry-After", "1"))
    except ValueError:
        wait = 1.0
    time.sleep(min(max(wait, 0.1), 30.0))


def _export_files(path: Path) -> list[Path]:
    """``path`` itself, or for an ACRO output folder its results.json and the files it names
    (plain names inside the folder only)."""
    if not path.is_dir():
        return [path]
    results = path / "results.json"
    if not results.is_file():
        raise ValueError(f"{path} is a folder without an ACRO results.json: name the files")
    doc = json.loads(results.read_text(encoding="utf-8"))
    names: list[str] = []
    for output in (doc.get("results") or {}).values():
        for entry in output.get("files") or []:
            name = str(entry.get("name", ""))
            if name and Path(name).name == name and name not in names:
                names.append(name)
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise ValueError(f"ACRO's results.json names files missing from {path}: "
                         + ", ".join(missing[:5]))
    return [results] + [path / n for n in names]


def _problem(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
        return body if isinstance(body, dict) else {"detail": str(body)}
    except ValueError:
        return {"title": "HTTP error", "detail": resp.text[:200]}


def connect(url: str | None = None, token: str | None = None, permit_id: str | None = None,
            **kwargs: Any) -> Client:
    """A client from arguments or the SPE_API_URL / SPE_TOKEN / SPE_PERMIT_ID variables; with
    SPE_TOKEN_FILE (set in workspaces) it always sends the newest token from that file."""
    url = url or os.environ.get(ENV_URL)
    token_file = kwargs.pop("token_file", None) or os.environ.get(ENV_TOKEN_FILE)
    token = token or os.environ.get(ENV_TOKEN) or (
        WorkspaceTokenAuth("", token_file).current() if token_file else None)
    permit_id = permit_id or os.environ.get(ENV_PERMIT)
    missing = [n for n, v in ((ENV_URL, url), (ENV_TOKEN, token), (ENV_PERMIT, permit_id))
               if not v]
    if missing:
        raise SPEClientError(0, {"title": "Not configured",
                                 "detail": "set " + ", ".join(missing)})
    assert url and token and permit_id
    return Client(url, token, permit_id, token_file=token_file, **kwargs)


def ray(**init_kwargs: Any) -> Any:
    """Start (or attach to) this workspace's private Ray head and connect a driver to it.

    Inside a workspace the head runs in the sandbox with exactly the CPUs and GPUs the permit's
    quota was allocated, token authentication on and no dashboard (see
    ``workspaces.ray_head``); never a cluster shared with other workspaces. Returns what
    ``ray.init`` returns; keyword arguments go to ``ray.init``.
    """
    import ray as ray_module

    from workspaces.ray_head import ensure_head

    address = ensure_head()
    if ray_module.is_initialized():
        return ray_module.get_runtime_context()
    init_kwargs.setdefault("logging_level", "ERROR")
    return ray_module.init(address=address, **init_kwargs)
