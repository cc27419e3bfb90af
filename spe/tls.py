"""TLS material: a local certificate authority for development, and checks of files given.

Contract:
- :func:`ensure_local_ca` creates (once) in one directory, mode 0700, a local CA (``ca.pem``,
  key ``ca.key``) and a leaf certificate for the SPE's listeners (``server.pem``, key
  ``server.key``) naming every host given as a subject alternative name. Keys are written
  0600 before any byte of them is, and are never re-created while valid, so clients that
  trust ``ca.pem`` keep trusting the listeners across restarts. The leaf is re-issued when it
  is within 30 days of expiry or does not name a host asked for. For development only: a
  production deployment names certificate files issued by its own CA in the settings.
- :func:`private_key_problem` says what is wrong with a private key or secret file's
  permissions (readable or writable by group or others, not a regular file), or ``None``.
- :func:`certificate_problems` checks a certificate/key pair against a CA bundle and a host.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 397
RENEW_BEFORE = dt.timedelta(days=30)
#: The name a workspace sandbox uses for the SPE API under TLS: its /etc/hosts maps it to the
#: host end of its veth link, and the API's certificate must name it (the local CA's leaf does).
WORKSPACE_API_HOST = "spe-api.internal"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1", WORKSPACE_API_HOST)


@dataclass(frozen=True)
class TlsFiles:
    """Where one set of TLS material lies: the CA bundle clients trust, the leaf and its key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def private_key_problem(path: Path) -> str | None:
    """Why ``path`` is not a safely kept key or secret file, or ``None`` when it is."""
    try:
        st = path.stat()
    except OSError:
        return f"{path} cannot be read"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"{path} has mode {mode:04o}: group or others may access it (chmod 0600)"
    return None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPE development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _make_ca(files: TlsFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("SPE local development CA")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(files.key_file.with_name("ca.key"), _key_pem(key))
    files.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _load_ca(files: TlsFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    key_path = files.key_file.with_name("ca.key")
    if not (files.ca_file.is_file() and key_path.is_file()):
        return None
    cert = x509.load_pem_x509_certificate(files.ca_file.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.not_valid_after_utc < _now():
        return None
    return cert, key


def _leaf_fits(files: TlsFiles, ca: x509.Certificate, hosts: list[str]) -> bool:
    if not (files.cert_file.is_file() and files.key_file.is_file()):
        return False
    cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    if cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - any failure: re-issue
        return False
    named = set(_san(hosts))
    have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    return named <= have


def _make_leaf(
    files: TlsFiles, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(files.key_file, _key_pem(key))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_local_ca(directory: Path, hosts: list[str] | None = None) -> TlsFiles:
    """The development CA and leaf in ``directory`` (created 0700), made or renewed as needed."""
    wanted = list(dict.fromkeys([*(hosts or []), *DEFAULT_HOSTS]))
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    loaded = _load_ca(files)
    ca, ca_key = loaded if loaded is not None else _make_ca(files)
    if loaded is None or not _leaf_fits(files, ca, wanted):
        _make_leaf(files, ca, ca_key, wanted)
    return files


def names_host(cert_file: Path, host: str) -> bool:
    """Whether the PEM certificate in ``cert_file`` names ``host`` (False when unreadable)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False
    return _host_matches(cert, host)


def _host_matches(cert: x509.Certificate, host: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        pass
    for name in san.get_values_for_type(x509.DNSName):
        if name == host or (
            name.startswith("*.") and host.endswith(name[1:]) and host.count(".") == name.count(".")
        ):
            return True
    return False


def certificate_problems(
    cert_file: Path | None, key_file: Path | None, ca_file: Path | None, host: str | None
) -> list[str]:
    """What is wrong with a listener's certificate files (empty when nothing is)."""
    if cert_file is None or key_file is None:
        return ["no certificate and key files are set"]
    problems = []
    if (why := private_key_problem(key_file)) is not None:
        problems.append(why)
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return [*problems, f"{cert_file} is not a readable PEM certificate"]
    if cert.not_valid_after_utc < _now():
        problems.append(f"{cert_file} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if host is not None and not _host_matches(cert, host):
        problems.append(f"{cert_file} does not name {host}")
    if ca_file is None:
        problems.append("no CA bundle is set for the SPE's own clients (tls_ca_file)")
    else:
        try:
            cas = x509.load_pem_x509_certificates(ca_file.read_bytes())
        except (OSError, ValueError):
            return [*problems, f"{ca_file} is not a readable PEM bundle"]
        if not any(_issued_by(cert, ca) for ca in cas):
            problems.append(f"{cert_file} is not issued by a CA in {ca_file}")
    return problems


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - any mismatch or bad signature means: not this CA
        return False
    return True
