"""`spe airlock list|show|decide`: the review queue for hospital admins, over the SPE API.

The CLI acts as the admin's own identity: it sends the admin's Keycloak access token from
``SPE_TOKEN`` (never an argument, so it stays out of the process list and shell history) to
``/v1/permits/{id}/exports`` at ``--api-url`` (default: the settings' ``public_url`` or
``api_host:api_port``). Everything the API enforces holds: reviewers other than the requester,
votes hidden until you voted, overrides need a reason, every act audited.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import typer

app = typer.Typer(help="Export review (hospital admins; token in SPE_TOKEN).",
                  no_args_is_help=True)

#: Tests swap in the app's in-process transport here.
TRANSPORT: httpx.BaseTransport | None = None


def _client(api_url: str | None) -> httpx.Client:
    token = os.environ.get("SPE_TOKEN", "")
    if not token:
        typer.secho("set SPE_TOKEN to your access token (hospital-admin login)", fg="red",
                    err=True)
        raise typer.Exit(2)
    if api_url is None:
        from spe.config import get_settings

        api_url = get_settings().api_base_url
    return httpx.Client(base_url=api_url.rstrip("/"), transport=TRANSPORT, timeout=60,
                        headers={"Authorization": f"Bearer {token}"})


def _call(api_url: str | None, method: str, path: str, **kwargs: Any) -> Any:
    with _client(api_url) as http:
        resp = http.request(method, path, **kwargs)
    if resp.status_code >= 400:
        try:
            problem = resp.json()
            detail = problem.get("detail", "") if isinstance(problem, dict) else ""
        except ValueError:
            detail = ""
        typer.secho(f"refused ({resp.status_code}): {detail}", fg="red", err=True)
        raise typer.Exit(1)
    return resp.json()


ApiUrl = typer.Option(None, "--api-url", help="SPE API base URL.")


@app.command("list")
def list_exports(permit: str, api_url: str | None = ApiUrl,
                 state: str | None = typer.Option(None, help="Only requests in this state.")
                 ) -> None:
    """A permit's export requests: id, state, requester, files, votes received."""
    items = _call(api_url, "GET", f"/v1/permits/{permit}/exports")["items"]
    for item in items:
        if state and item["state"] != state:
            continue
        typer.echo(f"{item['id']}  {item['state']:<22} {item['requester']:<16} "
                   f"files={len(item['files'])} votes={item['votes_received']}/"
                   f"{item['reviewers_required']}")


@app.command("show")
def show(permit: str, export_id: str, api_url: str | None = ApiUrl) -> None:
    """One request with every file's checks (JSON)."""
    typer.echo(json.dumps(_call(api_url, "GET", f"/v1/permits/{permit}/exports/{export_id}"),
                          indent=2))


@app.command("decide")
def decide(permit: str, export_id: str,
           decision: str = typer.Option(..., help="approve, reject or return"),
           comment: str | None = typer.Option(None, help="Your comment."),
           shared: bool = typer.Option(False, help="Show the comment to the researcher."),
           override_reason: str | None = typer.Option(
               None, help="Needed to approve over a failed check, or reject when all passed."),
           api_url: str | None = ApiUrl) -> None:
    """Vote on a request in review."""
    if decision not in ("approve", "reject", "return"):
        typer.secho("decision is approve, reject or return", fg="red", err=True)
        raise typer.Exit(2)
    body = {"decision": decision, "comment": comment, "shared": shared,
            "override_reason": override_reason}
    got = _call(api_url, "POST", f"/v1/permits/{permit}/exports/{export_id}/votes",
                json={k: v for k, v in body.items() if v is not None})
    typer.echo(f"{got['id']}  {got['state']}  votes={got['votes_received']}/"
               f"{got['reviewers_required']}")
