"""Supply-chain checks and software bills of materials (SBOMs) for set-up.

Standard library only, so it runs with any Python 3.11 (the project's .venv or the system one).

    python scripts/supply_chain.py sbom --env .venv --lock requirements/dev.txt \\
        --name spe-venv -o var/sbom/project-venv.cdx.json
    python scripts/supply_chain.py npm-verify          # node_modules matches package-lock.json
    python scripts/supply_chain.py npm-sbom -o var/sbom/npm.cdx.json
    python scripts/supply_chain.py audit --lock requirements/dev.txt -o var/sbom/vuln.json

``sbom`` lists every distribution installed in a Python environment (CycloneDX 1.5 JSON) with
its version, its package URL and its SHA-256: the hash of the exact file pip installed where an
install report kept it (``<env>/.spe-install-reports/*.json``, written by set-up), else the
hashes the lock allowed for that version (pip installs with ``--require-hashes``, so the
installed file is one of them). A package installed by hand, outside the lock, is listed with
``spe:locked = false`` and no hash, and named on standard error.

``npm-verify`` refuses a lock entry without an integrity hash and an installed tree whose
packages differ (name, version, integrity) from ``package-lock.json`` (npm ci checks each
tarball against those integrity hashes when it installs). Exit status 1 with the reasons.

``audit`` runs pip-audit on a lock (``npm-audit``: npm audit on package-lock.json) where its
vulnerability database is reachable; where it is not, it says so and exits 0 (a scan that cannot
run is reported, not failed).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_REQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")

_LIST_DISTS = """
import importlib.metadata as m, json, pathlib
out = []
for d in m.distributions():
    rec = d.read_text("RECORD") or ""
    meta = d.metadata
    lic = meta.get("License-Expression") or " OR ".join(
        c.split(" :: ")[-1] for c in (meta.get_all("Classifier") or [])
        if c.startswith("License ::")) or ((meta.get("License") or "").strip().splitlines()
                                           or [""])[0][:100]
    out.append({"name": meta["Name"], "version": d.version, "license": lic,
                "record_sha256": __import__("hashlib").sha256(rec.encode()).hexdigest()})
print(json.dumps(out))
"""


def canonical(name: str) -> str:
    """PEP 503 normalised name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``{canonical name: (version, [sha256, ...])}`` of a pip-compile/uv lock with hashes."""
    locked: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        match = _REQ.match(line)
        if match:
            current = canonical(match.group(1))
            locked[current] = (match.group(2), [])
        if current is not None:
            locked[current][1].extend(_HASH.findall(line))
        if not line.endswith("\\"):
            current = None
    return locked


def installed(env: Path) -> list[dict[str, str]]:
    """Distributions installed in the environment whose interpreter is ``env/bin/python``."""
    proc = subprocess.run([str(env / "bin" / "python"), "-c", _LIST_DISTS], check=True,
                          capture_output=True, text=True)
    dists: list[dict[str, str]] = json.loads(proc.stdout)
    seen: dict[str, dict[str, str]] = {}
    for dist in dists:  # a name twice on the path: the first one is the one imported
        seen.setdefault(canonical(dist["name"]), dist)
    return sorted(seen.values(), key=lambda d: canonical(d["name"]))


def installed_artifacts(env: Path) -> dict[tuple[str, str], str]:
    """``{(name, version): sha256}`` of the files pip installed, from its install reports."""
    artifacts: dict[tuple[str, str], str] = {}
    for report in sorted((env / ".spe-install-reports").glob("*.json")):
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            continue
        for item in data.get("install", []):
            meta = item.get("metadata", {})
            archive = item.get("download_info", {}).get("archive_info", {})
            sha = archive.get("hashes", {}).get("sha256")
            if sha is None and str(archive.get("hash", "")).startswith("sha256="):
                sha = archive["hash"].split("=", 1)[1]
            if sha and meta.get("name") and meta.get("version"):
                artifacts[(canonical(meta["name"]), meta["version"])] = sha
    return artifacts


def _project_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return match.group(1) if match else "0"


def _bom(name: str, components: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "tools": {"components": [{"type": "application", "name": "spe-supply-chain"}]},
            "component": {"type": "application", "bom-ref": name, "name": name,
                          "version": _project_version()},
        },
        "components": components,
    }


def python_sbom(env: Path, lock: Path, name: str) -> tuple[dict[str, Any], list[str]]:
    """The SBOM of ``env`` and the names installed there outside the lock."""
    locked = parse_lock(lock)
    artifacts = installed_artifacts(env)
    components: list[dict[str, Any]] = []
    unlocked: list[str] = []
    for dist in installed(env):
        key = canonical(dist["name"])
        version = dist["version"]
        purl = f"pkg:pypi/{key}@{version}"
        props = []
        if key == "spe":  # this project, installed from the checkout
            hashes = [dist["record_sha256"]]
            props.append({"name": "spe:hash-source", "value": "installed-record"})
        elif (key, version) in artifacts:
            hashes = [artifacts[(key, version)]]
            props.append({"name": "spe:hash-source", "value": "installed-artifact"})
        elif key in locked and locked[key][0] == version and locked[key][1]:
            hashes = locked[key][1]
            props.append({"name": "spe:hash-source", "value": "lock"})
        else:
            hashes = []
            unlocked.append(f"{dist['name']}=={version}")
        props.append({"name": "spe:locked", "value": "true" if hashes else "false"})
        component: dict[str, Any] = {
            "type": "library", "bom-ref": purl, "name": dist["name"], "version": version,
            "purl": purl, "hashes": [{"alg": "SHA-256", "content": h} for h in hashes],
            "properties": props,
        }
        if dist.get("license"):
            component["licenses"] = [{"license": {"name": dist["license"]}}]
        components.append(component)
    return _bom(name, components), unlocked


def _lock_packages(lock: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(lock.read_text())
    return {k: v for k, v in data.get("packages", {}).items() if k}


def npm_problems(lock: Path, modules: Path) -> list[str]:
    """Why the installed npm tree cannot be trusted (empty when it matches the lock)."""
    problems: list[str] = []
    wanted = _lock_packages(lock)
    for path, entry in wanted.items():
        if entry.get("link"):
            continue
        if not str(entry.get("integrity", "")).startswith("sha512-"):
            problems.append(f"{path}: no sha512 integrity recorded in {lock.name}")
    hidden = modules / ".package-lock.json"
    if not hidden.is_file():
        return [*problems, f"{modules.name} was not installed from {lock.name} (npm ci)"]
    have = _lock_packages(hidden)
    for path, entry in wanted.items():
        got = have.get(path)
        if got is None:
            problems.append(f"{path}: missing from the installed tree")
        elif (got.get("version"), got.get("integrity")) != (entry.get("version"),
                                                           entry.get("integrity")):
            problems.append(f"{path}: installed {got.get('version')} differs from the lock")
        else:
            manifest = lock.parent / path / "package.json"
            if manifest.is_file() and json.loads(manifest.read_text()).get("version") != \
                    entry.get("version"):
                problems.append(f"{path}: package.json version differs from the lock")
    problems += [f"{path}: installed but not in the lock" for path in have if path not in wanted]
    return problems


def npm_sbom(lock: Path, name: str) -> dict[str, Any]:
    components = []
    for path, entry in sorted(_lock_packages(lock).items()):
        pkg = path.rsplit("node_modules/", 1)[-1]
        purl = f"pkg:npm/{pkg.replace('@', '%40')}@{entry.get('version')}"
        integrity = str(entry.get("integrity", ""))
        hashes = []
        if integrity.startswith("sha512-"):
            hashes = [{"alg": "SHA-512",
                       "content": base64.b64decode(integrity[7:]).hex()}]
        component: dict[str, Any] = {"type": "library", "bom-ref": purl, "name": pkg,
                                     "version": entry.get("version"), "purl": purl,
                                     "hashes": hashes}
        if entry.get("license"):
            component["licenses"] = [{"license": {"name": str(entry["license"])}}]
        components.append(component)
    return _bom(name, components)


def _write(path: Path, bom: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bom, indent=1) + "\n")


def audit(lock: Path, out: Path, tool: Path, timeout: float) -> int:
    """pip-audit of a hashed lock; a database that cannot be reached is reported, not failed."""
    if not tool.exists():
        print(f"vulnerability scan: skipped ({tool.name} is not installed)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(tool), "-r", str(lock), "--require-hashes", "--disable-pip", "-s", "osv",
            "--timeout", "10", "-f", "json", "-o", str(out), "--progress-spinner", "off"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"vulnerability scan: skipped (no answer from the database in {timeout:.0f} s)")
        return 0
    text = proc.stdout + proc.stderr
    if "ConnectionError" in text or "Failed to resolve" in text or "Max retries" in text:
        print("vulnerability scan: skipped (the vulnerability database is not reachable "
              "from this machine)")
        return 0
    try:
        report = json.loads(out.read_text())
    except (OSError, ValueError):
        print(f"vulnerability scan: could not run ({text.strip().splitlines()[-1:]})")
        return 0
    found = [(d["name"], d["version"], v["id"]) for d in report.get("dependencies", [])
             for v in d.get("vulns", [])]
    if found:
        print(f"vulnerability scan: {len(found)} known vulnerabilities in {lock.name} "
              f"(details: {out}):")
        for name, version, vid in found:
            print(f"  {name} {version}: {vid}")
    else:
        print(f"vulnerability scan: no known vulnerabilities in {lock.name}")
    return 0


def npm_audit(project: Path, out: Path, timeout: float) -> int:
    """``npm audit`` of package-lock.json; an unreachable advisory database is reported only."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["npm", "audit", "--package-lock-only", "--json"], cwd=project,
                              capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        print("npm vulnerability scan: skipped (npm is not installed)")
        return 0
    except subprocess.TimeoutExpired:
        print(f"npm vulnerability scan: skipped (no answer in {timeout:.0f} s)")
        return 0
    out.write_text(proc.stdout)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    counts = report.get("metadata", {}).get("vulnerabilities") if isinstance(report, dict) else None
    if not isinstance(counts, dict):
        print("npm vulnerability scan: skipped (the advisory database is not reachable "
              "from this machine)")
        return 0
    found = {k: v for k, v in counts.items() if k != "total" and v}
    if found:
        print(f"npm vulnerability scan: {counts.get('total', sum(found.values()))} known "
              f"vulnerabilities ({', '.join(f'{v} {k}' for k, v in found.items())}; "
              f"details: {out})")
    else:
        print("npm vulnerability scan: no known vulnerabilities in package-lock.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sbom")
    p.add_argument("--env", type=Path, required=True)
    p.add_argument("--lock", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    p = sub.add_parser("npm-verify")
    p.add_argument("--lock", type=Path, default=ROOT / "package-lock.json")
    p.add_argument("--modules", type=Path, default=ROOT / "node_modules")
    p = sub.add_parser("npm-sbom")
    p.add_argument("--lock", type=Path, default=ROOT / "package-lock.json")
    p.add_argument("-o", "--output", type=Path, required=True)
    p = sub.add_parser("audit")
    p.add_argument("--lock", type=Path, required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--tool", type=Path, default=Path(sys.executable).parent / "pip-audit")
    p.add_argument("--timeout", type=float, default=90)
    p = sub.add_parser("npm-audit")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args(argv)

    if args.cmd == "sbom":
        bom, unlocked = python_sbom(args.env, args.lock, args.name)
        _write(args.output, bom)
        if unlocked:
            print(f"sbom: {len(unlocked)} package(s) in {args.env} were installed outside "
                  f"{args.lock} (no recorded hash): {', '.join(unlocked)}", file=sys.stderr)
        return 0
    if args.cmd == "npm-verify":
        problems = npm_problems(args.lock, args.modules)
        for problem in problems:
            print(f"npm-verify: {problem}", file=sys.stderr)
        return 1 if problems else 0
    if args.cmd == "npm-sbom":
        _write(args.output, npm_sbom(args.lock, "spe-npm"))
        return 0
    if args.cmd == "npm-audit":
        return npm_audit(ROOT, args.output, args.timeout)
    return audit(args.lock, args.output, args.tool, args.timeout)


if __name__ == "__main__":
    sys.exit(main())

