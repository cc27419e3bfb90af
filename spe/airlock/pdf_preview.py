"""A PDF's page as a PNG for reviewers, rasterised by poppler's ``pdftoppm`` in a sandbox.

Contract
--------
:func:`first_page_png` returns ``(png, None)`` or ``(None, why)``. A researcher's PDF is never
sent to a reviewer's browser: it is rasterised on the server, so no script, form, link or font
of the file runs there. ``pdftoppm`` (Debian's poppler-utils) runs under bubblewrap with no
network, no other processes, no privilege (user ``nobody`` in its own user namespace, every
capability dropped), the system's programs read-only and a private folder holding only the
file; it is limited to :data:`CPU_SECONDS` of CPU, :data:`MEMORY_BYTES` of address
space, :data:`OUTPUT_BYTES` per written file and :data:`TIMEOUT` seconds of wall time. Without
``pdftoppm`` or ``bwrap`` there is no preview (the reason says which is missing); the file is
never rendered outside the sandbox.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

CPU_SECONDS = 10
MEMORY_BYTES = 1 << 30
OUTPUT_BYTES = 20 << 20
TIMEOUT = 20.0
DPI = 80
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _limits() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_BYTES, OUTPUT_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _system_binds() -> list[str]:
    """The read-only system folders the rasteriser needs (merged-/usr symlinks kept)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("lib", "lib64", "bin"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", str(path.readlink()), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    if Path("/etc/fonts").is_dir():
        args += ["--ro-bind", "/etc/fonts", "/etc/fonts"]
    return args


def available() -> str | None:
    """None when previews can run, else why not."""
    missing = [tool for tool in ("pdftoppm", "bwrap") if shutil.which(tool) is None]
    if missing:
        return (f"No PDF preview: {' and '.join(missing)} not installed on the server "
                "(poppler-utils, bubblewrap). Download it only on a machine meant for it.")
    return None


def sandboxed(work: Path, program: list[str]) -> list[str]:
    """``program`` under bubblewrap with ``work`` as its only writable folder ``/w``."""
    # As root, bwrap keeps root's capabilities unless told: a user namespace mapped to nobody
    # and every capability dropped, so a parser exploit holds no privilege.
    return ["bwrap", "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
            "--cap-drop", "ALL", "--die-with-parent", "--new-session", *_system_binds(),
            "--dev", "/dev", "--bind", str(work), "/w", "--chdir", "/w", "--clearenv",
            "--setenv", "PATH", "/usr/bin", "--", *program]


def first_page_png(data: bytes) -> tuple[bytes | None, str | None]:
    """The first page of ``data`` as a PNG (see module docstring)."""
    why = available()
    if why is not None:
        return None, why
    with tempfile.TemporaryDirectory(prefix="spe-pdf-") as tmp:
        work = Path(tmp)
        (work / "in.pdf").write_bytes(data)
        command = sandboxed(work, ["pdftoppm", "-png", "-r", str(DPI), "-f", "1", "-l", "1",
                                   "-singlefile", "in.pdf", "out"])
        try:
            done = subprocess.run(command, capture_output=True, timeout=TIMEOUT,
                                  preexec_fn=_limits, check=False)
        except subprocess.TimeoutExpired:
            return None, "No preview: rasterising the PDF took too long."
        out = work / "out.png"
        if done.returncode != 0 or not out.is_file():
            return None, "No preview: the PDF could not be rasterised."
        png = out.read_bytes()
        if not png.startswith(PNG_MAGIC):
            return None, "No preview: the PDF could not be rasterised."
        return png, None
