"""Supply chain (issue 18): what set-up installs is checked against recorded hashes first.

- a runtime wheel whose hash differs from the lock is refused by the runtime's installer
  (control: the same tampered wheel installs when the hash check is left out);
- a Keycloak zip whose SHA-256 differs from infra/keycloak/keycloak-dist.sha256 is refused
  before it is unpacked (control: the checker accepts the file whose hash it records);
- the npm tree is checked against package-lock.json's integrity hashes;
- the SBOM lists every installed package with its version and hash;
- (the locks' coverage of pyproject.toml and the runtime: tests/unit/test_project_files.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from workspaces import runtime

ROOT = Path(__file__).resolve().parents[2]
KEYCLOAK_SH = ROOT / "infra" / "keycloak" / "keycloak.sh"
KC_VERSION = "26.5.5"


def _supply_chain() -> ModuleType:
    spec = importlib.util.spec_from_file_location("supply_chain",
                                                  ROOT / "scripts" / "supply_chain.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["supply_chain"] = module
    spec.loader.exec_module(module)
    return module


sc = _supply_chain()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wheel(directory: Path, body: str) -> Path:
    """A minimal pure-Python wheel spe_probe 1.0 whose module holds ``body``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "spe_probe-1.0-py3-none-any.whl"
    files = {
        "spe_probe.py": f"VALUE = {body!r}\n",
        "spe_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: spe-probe\n"
                                            "Version: 1.0\n",
        "spe_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
                                         "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},," for name in files] + ["spe_probe-1.0.dist-info/RECORD,,"]
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr("spe_probe-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def _lock(path: Path, wheel: Path) -> Path:
    path.write_text(f"spe-probe==1.0 \\\n    --hash=sha256:{_sha256(wheel)}\n")
    return path


def _offline(wheels: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheels), "--disable-pip-version-check"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sc") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path


def _probe(env: Path) -> str:
    out = subprocess.run([str(env / "bin" / "python"), "-c",
                          "import spe_probe; print(spe_probe.VALUE)"],
                         capture_output=True, text=True, check=True, cwd="/")
    return out.stdout.strip()


def test_runtime_installer_refuses_a_wheel_whose_hash_differs(
        tmp_path: Path, venv: Path, capfd: pytest.CaptureFixture[str]) -> None:
    wheels = tmp_path / "wheels"
    lock = _lock(tmp_path / "runtime.txt", _wheel(wheels, "published"))
    runtime.install_locked(venv / "bin" / "python", lock, pip_args=_offline(wheels))
    assert _probe(venv) == "published"

    # The same name and version, other bytes: what a compromised mirror or cache would serve.
    tampered = tmp_path / "tampered"
    _wheel(tampered, "tampered")
    capfd.readouterr()
    with pytest.raises(subprocess.CalledProcessError):
        runtime.install_locked(venv / "bin" / "python", lock,
                               pip_args=[*_offline(tampered), "--force-reinstall"])
    assert "DO NOT MATCH THE HASHES" in capfd.readouterr().err
    assert _probe(venv) == "published"

    # Control: without the lock's hash check the tampered wheel would have been installed.
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--force-reinstall", *_offline(tampered), "spe-probe==1.0"], check=True)
    assert _probe(venv) == "tampered"


def test_runtime_build_installs_from_the_hashed_lock(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    calls: list[tuple[Path, dict[str, object]]] = []

    def fake_install(python: Path, lock: Path, **kw: object) -> None:
        calls.append((lock, kw))

    monkeypatch.setattr(runtime, "install_locked", fake_install)
    monkeypatch.setattr(runtime, "_install_project", lambda path, project: None)
    rt = tmp_path / "rt"
    (rt / "bin").mkdir(parents=True)
    (rt / "bin" / "python").touch()
    runtime.build(rt)
    assert calls and calls[0][0] == ROOT / "requirements" / "runtime.txt"
    assert calls[0][1]["report_dir"] == rt / ".spe-install-reports"


def test_sbom_lists_every_installed_package_with_version_and_hash(
        tmp_path: Path, venv: Path) -> None:
    wheels = tmp_path / "wheels"
    wheel = _wheel(wheels, "published")
    lock = _lock(tmp_path / "lock.txt", wheel)
    runtime.install_locked(venv / "bin" / "python", lock, report_dir=venv / ".spe-install-reports",
                           pip_args=[*_offline(wheels), "--force-reinstall"])
    bom, unlocked = sc.python_sbom(venv, lock, "probe-env")
    assert bom["bomFormat"] == "CycloneDX" and bom["specVersion"] == "1.5"
    by_name = {sc.canonical(c["name"]): c for c in bom["components"]}
    installed = {sc.canonical(d["name"]): d["version"] for d in sc.installed(venv)}
    assert set(by_name) == set(installed)
    for name, version in installed.items():
        assert by_name[name]["version"] == version
        assert by_name[name]["purl"] == f"pkg:pypi/{name}@{version}"
    probe = by_name["spe-probe"]
    assert probe["hashes"] == [{"alg": "SHA-256", "content": _sha256(wheel)}]
    # pip itself came with the venv, not from this lock: listed, flagged, no invented hash.
    assert any(u.startswith("pip==") for u in unlocked)
    assert by_name["pip"]["hashes"] == []


@pytest.mark.parametrize(("env", "lock", "sbom"), [
    ("var/runtime", "requirements/runtime.txt", "var/sbom/workspace-runtime.cdx.json"),
    (".venv", "requirements/dev.txt", "var/sbom/project-venv.cdx.json"),
])
def test_setup_sbom_covers_the_environment(env: str, lock: str, sbom: str) -> None:
    if not (ROOT / sbom).is_file() or not (ROOT / env / "bin" / "python").exists():
        pytest.skip(f"{sbom} is written by scripts/setup.sh, which has not run here")
    written = json.loads((ROOT / sbom).read_text())
    assert written["bomFormat"] == "CycloneDX" and written["components"]
    for component in written["components"]:
        assert component["version"] and component["purl"].endswith("@" + component["version"])
        assert all(re.fullmatch(r"[0-9a-f]{64}", h["content"]) for h in component["hashes"])
    # The environment as it is now (the file above is as of the last set-up): everything
    # installed from the lock is listed with its hash; packages added by hand are flagged.
    bom, unlocked = sc.python_sbom(ROOT / env, ROOT / lock, "check")
    by_name = {sc.canonical(c["name"]): c for c in bom["components"]}
    installed = {sc.canonical(d["name"]): d["version"] for d in sc.installed(ROOT / env)}
    assert set(installed) == set(by_name)
    locked = sc.parse_lock(ROOT / lock)
    for name, version in installed.items():
        assert by_name[name]["version"] == version
        if name in locked and locked[name][0] == version:
            assert by_name[name]["hashes"], name
    if env == "var/runtime":  # built only by set-up: nothing in it is outside the lock
        assert unlocked == [] and all(c["hashes"] for c in written["components"])


# --- Keycloak distribution --------------------------------------------------------------


def _fake_zip(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"keycloak-{KC_VERSION}/bin/kc.sh", content)
    return path


def _kc(*args: str, env: dict[str, str] | None = None,
        script: Path = KEYCLOAK_SH) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_keycloak_checker_refuses_a_modified_zip(tmp_path: Path) -> None:
    zip_path = _fake_zip(tmp_path / f"keycloak-quarkus-dist-{KC_VERSION}.zip", "#!/bin/sh\n")
    sums = tmp_path / "sums"
    sums.write_text(f"{_sha256(zip_path)}  {zip_path.name}\n")
    ok = _kc("verify", str(zip_path), env={"SPE_KEYCLOAK_CHECKSUMS": str(sums)})
    assert ok.returncode == 0, ok.stderr  # control: the recorded file passes

    data = bytearray(zip_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    zip_path.write_bytes(bytes(data))
    refused = _kc("verify", str(zip_path), env={"SPE_KEYCLOAK_CHECKSUMS": str(sums)})
    assert refused.returncode != 0 and "REFUSED" in refused.stderr

    unknown = tmp_path / "keycloak-quarkus-dist-0.0.1.zip"
    shutil.copy(zip_path, unknown)
    refused = _kc("verify", str(unknown))  # no hash recorded for this version: fail closed
    assert refused.returncode != 0 and "no SHA-256 recorded" in refused.stderr


def test_keycloak_start_refuses_a_tampered_cached_zip_before_unpacking(tmp_path: Path) -> None:
    if shutil.which("java") is None:
        pytest.skip("no JDK: keycloak.sh checks Java before the distribution")
    checkout = tmp_path / "checkout" / "infra" / "keycloak"
    checkout.mkdir(parents=True)
    for name in ("keycloak.sh", "realm-spe.json", "keycloak-dist.sha256"):
        shutil.copy2(KEYCLOAK_SH.parent / name, checkout / name)
    cache = tmp_path / "cache"
    _fake_zip(cache / "keycloak" / f"keycloak-quarkus-dist-{KC_VERSION}.zip", "echo evil\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _kc("start", "--port", str(port), script=checkout / "keycloak.sh",
                 env={"SPE_CACHE_DIR": str(cache), "SPE_KEYCLOAK_VERSION": KC_VERSION,
                      "SPE_KEYCLOAK_CHECKSUMS": ""})
    assert result.returncode != 0
    assert "REFUSED" in result.stderr, result.stderr
    assert not (cache / "keycloak" / f"keycloak-{KC_VERSION}").exists()  # never unpacked


def test_recorded_keycloak_hash_matches_the_cached_distribution() -> None:
    cache = Path(os.environ.get("SPE_CACHE_DIR", Path.home() / ".cache" / "spe"))
    zip_path = cache / "keycloak" / f"keycloak-quarkus-dist-{KC_VERSION}.zip"
    if not zip_path.is_file():
        pytest.skip("Keycloak has not been fetched on this machine")
    result = _kc("verify", str(zip_path))
    assert result.returncode == 0, result.stderr


# --- npm --------------------------------------------------------------------------------


def _npm_tree(root: Path) -> tuple[Path, Path]:
    lock = root / "package-lock.json"
    lock.write_text((ROOT / "package-lock.json").read_text())
    modules = root / "node_modules"
    modules.mkdir()
    data = json.loads(lock.read_text())
    hidden = {"name": "x", "lockfileVersion": 3,
              "packages": {k: v for k, v in data["packages"].items() if k}}
    (modules / ".package-lock.json").write_text(json.dumps(hidden))
    return lock, modules


def test_npm_tree_is_checked_against_the_lock_integrity(tmp_path: Path) -> None:
    lock, modules = _npm_tree(tmp_path)
    assert sc.npm_problems(lock, modules) == []

    hidden = json.loads((modules / ".package-lock.json").read_text())
    first = sorted(hidden["packages"])[0]
    hidden["packages"][first]["integrity"] = "sha512-" + "A" * 86 + "=="
    (modules / ".package-lock.json").write_text(json.dumps(hidden))
    assert any(first in p for p in sc.npm_problems(lock, modules))

    data = json.loads(lock.read_text())
    del data["packages"][first]["integrity"]
    lock.write_text(json.dumps(data))
    assert any("no sha512 integrity" in p for p in sc.npm_problems(lock, modules))
    assert sc.main(["npm-verify", "--lock", str(lock), "--modules", str(modules)]) == 1


def test_installed_npm_tree_matches_the_lock_and_its_sbom(tmp_path: Path) -> None:
    if not (ROOT / "node_modules" / ".package-lock.json").is_file():
        pytest.skip("npm packages are installed by scripts/setup.sh, which has not run here")
    assert sc.npm_problems(ROOT / "package-lock.json", ROOT / "node_modules") == []
    out = tmp_path / "npm.cdx.json"
    assert sc.main(["npm-sbom", "-o", str(out)]) == 0
    components = json.loads(out.read_text())["components"]
    assert any(c["name"] == "configurable-http-proxy" for c in components)
    assert all(c["version"] and c["hashes"][0]["alg"] == "SHA-512" for c in components)


def _fake_dist_zip(root: Path) -> Path:
    """A stand-in distribution whose kc.sh exits at once (start fails after the check)."""
    src = root / "src" / f"keycloak-{KC_VERSION}"
    for sub in ("bin", "conf", "lib/lib", "lib/app", "lib/quarkus", "providers", "themes"):
        (src / sub).mkdir(parents=True)
    (src / "bin" / "kc.sh").write_text("#!/bin/sh\necho stand-in; exit 3\n")
    (src / "bin" / "kc.sh").chmod(0o755)
    (src / "conf" / "keycloak.conf").write_text("")
    (src / "lib" / "quarkus-run.jar").write_text("")
    zip_path = root / "cache" / "keycloak" / f"keycloak-quarkus-dist-{KC_VERSION}.zip"
    zip_path.parent.mkdir(parents=True)
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(src.parent.rglob("*")):
            name = path.relative_to(src.parent).as_posix() + ("/" if path.is_dir() else "")
            zf.write(path, name)
    shutil.copytree(src, zip_path.parent / src.name)  # unpacked before the check existed
    return zip_path


def test_keycloak_dist_unpacked_before_the_check_is_verified_or_unpacked_again(
        tmp_path: Path) -> None:
    if shutil.which("java") is None or shutil.which("unzip") is None:
        pytest.skip("no JDK or unzip: keycloak.sh needs both")
    checkout = tmp_path / "checkout" / "infra" / "keycloak"
    checkout.mkdir(parents=True)
    for name in ("keycloak.sh", "realm-spe.json"):
        shutil.copy2(KEYCLOAK_SH.parent / name, checkout / name)
    zip_path = _fake_dist_zip(tmp_path)
    sums = tmp_path / "sums"
    sums.write_text(f"{_sha256(zip_path)}  {zip_path.name}\n")
    dist = zip_path.parent / f"keycloak-{KC_VERSION}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"SPE_CACHE_DIR": str(tmp_path / "cache"), "SPE_KEYCLOAK_VERSION": KC_VERSION,
           "SPE_KEYCLOAK_CHECKSUMS": str(sums), "SPE_KEYCLOAK_START_TIMEOUT": "10"}

    first = _kc("start", "--port", str(port), script=checkout / "keycloak.sh", env=env)
    assert "does not match" not in first.stderr, first.stderr  # complete: kept as it is
    assert (dist / ".spe-verified").read_text().strip() == _sha256(zip_path)

    (dist / ".spe-verified").unlink()
    (dist / "conf" / "keycloak.conf").unlink()  # no longer what the zip holds
    second = _kc("start", "--port", str(port), script=checkout / "keycloak.sh", env=env)
    assert "does not match the verified zip; unpacking it again" in second.stderr
    assert (dist / "conf" / "keycloak.conf").exists() and (dist / ".spe-verified").exists()


# --- vulnerability scan -----------------------------------------------------------------


def _fake_tool(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_scan_says_so_and_passes_when_the_database_is_unreachable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = _fake_tool(tmp_path / "pip-audit",
                      "echo 'requests.exceptions.ConnectionError: Failed to resolve' >&2\n"
                      "exit 1\n")
    assert sc.audit(ROOT / "requirements" / "dev.txt", tmp_path / "v.json", tool, 30) == 0
    assert "skipped (the vulnerability database is not reachable" in capsys.readouterr().out


def test_scan_names_each_known_vulnerability(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    report = {"dependencies": [{"name": "jinja2", "version": "3.1.6",
                                "vulns": [{"id": "PYSEC-0000-1"}]},
                               {"name": "httpx", "version": "0.28.1", "vulns": []}]}
    # pip-audit writes its JSON report to the file after "-o" and exits 1 on findings.
    tool = _fake_tool(tmp_path / "pip-audit",
                      'while [ "$1" != "-o" ]; do shift; done\n'
                      f"echo '{json.dumps(report)}' > \"$2\"\nexit 1\n")
    assert sc.audit(ROOT / "requirements" / "dev.txt", tmp_path / "v.json", tool, 30) == 0
    out = capsys.readouterr().out
    assert "1 known vulnerabilities" in out and "jinja2 3.1.6: PYSEC-0000-1" in out
