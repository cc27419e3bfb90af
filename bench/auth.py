"""Benchmark of authentication: ``.venv/bin/python -m bench.auth [--seconds S]``.

Needs the bundled Keycloak (``infra/keycloak/keycloak.sh start``; URL from
``SPE_TEST_KEYCLOAK_URL``, default http://127.0.0.1:8180). Prints, in one run:

1. Keycloak access-token validations per second with the JWKS cached (signature, claims,
   principal mapping), and SPE workspace-token validations per second (signature + grant row +
   permit check in a SQLite control DB);
2. latency (median, p95) and sequential throughput of a trivial request served by a real uvicorn
   server, with and without bearer authentication, interleaved so both see the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn
from fastapi import APIRouter, Depends, FastAPI

from spe.api.app import create_app
from spe.auth.deps import get_principal
from spe.auth.keycloak_tokens import KeycloakTokenValidator
from spe.auth.permit_checks import CHECKER_KEY
from spe.auth.principal import Principal
from spe.auth.validator import get_validator
from spe.auth.workspace_tokens import mint_workspace_token
from spe.config import Settings
from spe.db import Database
from tests.ports import free_port


def _token(url: str) -> str:
    response = httpx.post(f"{url}/realms/spe/protocol/openid-connect/token", timeout=30, data={
        "grant_type": "password", "client_id": "spe-tests", "username": "alice",
        "password": "alice-dev-password"})
    response.raise_for_status()
    return str(response.json()["access_token"])


def _rate(fn: Callable[[], object], seconds: float) -> float:
    fn()  # warm
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            fn()
        count += 50
    return count / elapsed


def _bench_app(settings: Settings, db: Database) -> FastAPI:
    app = create_app(settings, db)
    router = APIRouter()

    @router.get("/bench/open")
    def open_route() -> dict[str, str]:
        return {"ok": "yes"}

    @router.get("/bench/authed")
    def authed_route(principal: Principal = Depends(get_principal)) -> dict[str, str]:
        return {"ok": principal.username}

    app.include_router(router)
    app.state.spe.put(CHECKER_KEY, lambda session, permit_id: True)
    return app


def _serve(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("bench server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _requests(base: str, headers: dict[str, str], n_rounds: int) -> dict[str, list[float]]:
    lat: dict[str, list[float]] = {"open": [], "authed": []}
    with httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(20):  # warm both paths
            client.get("/bench/open").raise_for_status()
            client.get("/bench/authed", headers=headers).raise_for_status()
        for _ in range(n_rounds):
            for name, hdrs in (("open", {}), ("authed", headers)):
                t0 = time.perf_counter()
                response = client.get(f"/bench/{name}", headers=hdrs)
                lat[name].append(time.perf_counter() - t0)
                response.raise_for_status()
    return lat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per validation measurement")
    parser.add_argument("--requests", type=int, default=1000, help="request pairs (open+authed)")
    args = parser.parse_args()
    kc_url = os.environ.get("SPE_TEST_KEYCLOAK_URL", "http://127.0.0.1:8180").rstrip("/")

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "var", keycloak_url=kc_url,
                            database_url=f"sqlite:///{Path(tmp) / 'control.db'}")
        db = Database(settings.resolved_database_url)
        db.upgrade()
        token = _token(kc_url)

        validator = KeycloakTokenValidator(settings)
        kc_rate = _rate(lambda: validator.validate(token), args.seconds)

        with db.write() as session:
            ws_token = mint_workspace_token(
                session, settings, subject="bench", username="alice", permit_id="BENCH",
                workspace_id="bench-ws", checker=lambda s, p: True).token
        app = _bench_app(settings, db)
        spe_validator = get_validator(app.state.spe)
        ws_rate = _rate(lambda: spe_validator.validate(ws_token), args.seconds)

        print(f"Keycloak token validations/s (cached JWKS, RS256): {kc_rate:,.0f}"
              f"  ({1e6 / kc_rate:.1f} us each; JWKS fetches: {validator.jwks.fetches})")
        print(f"Workspace token validations/s (EdDSA + grant row + permit check, SQLite): "
              f"{ws_rate:,.0f}  ({1e6 / ws_rate:.1f} us each)")

        server, thread, base = _serve(app)
        try:
            lat = _requests(base, {"Authorization": f"Bearer {token}"}, args.requests)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        print(f"Trivial request over HTTP (uvicorn, keep-alive, sequential, {args.requests} "
              "interleaved pairs):")
        for name in ("open", "authed"):
            xs = sorted(lat[name])
            p50, p95 = statistics.median(xs), xs[int(0.95 * (len(xs) - 1))]
            print(f"  {name:7s} median {p50 * 1e3:6.3f} ms  p95 {p95 * 1e3:6.3f} ms  "
                  f"throughput {len(xs) / sum(xs):8,.0f} req/s")
        added = statistics.median(lat["authed"]) - statistics.median(lat["open"])
        print(f"  cost of authentication per request (median difference): {added * 1e3:.3f} ms")
        db.dispose()


if __name__ == "__main__":
    main()
