"""Membership-inference attacks on exported models, as background jobs in their own
environment.

Contract
--------
* SACRO-ML needs PyTorch/XGBoost, which the SPE never installs. The setting
  ``airlock_sacroml_python`` names the interpreter of a separate virtual environment that has
  them; :func:`initial_check` says whether a job will run (``needs_review`` "MIA queued") or
  not ("MIA not run: no SACRO-ML environment configured"); either way the file goes to human
  review.
* :func:`run` runs :mod:`spe.airlock.mia_script` with that interpreter (isolated mode ``-I``,
  an empty environment but ``PATH``, the job as JSON on stdin, a wall-clock limit) and returns
  the result as a :class:`~spe.airlock.checks.Check` named ``model_mia``. A job that fails,
  times out or prints anything but the expected JSON gives ``needs_review`` with the reason;
  its outcome is never ``pass`` unless the script said so, and a pass never releases a model
  (models always need reviewers).
* :func:`start` runs :func:`run` on a daemon thread and hands the check to ``record`` (the
  service stores it on the file with an ``airlock.mia`` audit entry).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spe.airlock.checks import FAIL, PASS, REVIEW, Check
from spe.config import Settings

SCRIPT = Path(__file__).with_name("mia_script.py")
NAME = "model_mia"
NOT_CONFIGURED = "MIA not run: no SACRO-ML environment configured"
_OUTCOMES = {"pass": PASS, "fail": FAIL, "needs_review": REVIEW}


def configured(settings: Settings) -> Path | None:
    python = settings.airlock_sacroml_python
    return python if python is not None and python.is_file() else None


def initial_check(settings: Settings) -> Check:
    if configured(settings) is None:
        return Check(NAME, REVIEW, f"{NOT_CONFIGURED}; reviewers judge the model without it.")
    return Check(NAME, REVIEW, "MIA queued: SACRO-ML's membership-inference attack runs as a "
                 "background job; reviewers see its result here.", details={"state": "queued"})


def not_run(settings: Settings, why: str) -> Check:
    """The check of a queued job that will not run (``why``): reviewers judge without it."""
    if configured(settings) is None:
        return initial_check(settings)
    return Check(NAME, REVIEW, f"MIA not run: {why}; reviewers judge the model without it.",
                 details={"state": "lost"})


def run(settings: Settings, model_path: Path, kind: str, training_rows: int | None) -> Check:
    python = configured(settings)
    if python is None:
        return initial_check(settings)
    job = {"model_path": str(model_path), "kind": kind, "training_rows": training_rows,
           "data_path": None}
    try:
        done = subprocess.run(  # a configured interpreter, fixed arguments
            [str(python), "-I", str(SCRIPT)], input=json.dumps(job), capture_output=True,
            text=True, timeout=settings.airlock_mia_timeout_seconds, check=False,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    except subprocess.TimeoutExpired:
        return Check(NAME, REVIEW, "MIA job ran past its time limit and was stopped; "
                     "reviewers judge the model without it.", details={"state": "timeout"})
    except OSError:
        return Check(NAME, REVIEW, "MIA job could not start (the configured interpreter did "
                     "not run).", details={"state": "error"})
    result: Any = None
    if done.returncode == 0:
        try:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            result = None
    if not (isinstance(result, dict) and result.get("outcome") in _OUTCOMES
            and isinstance(result.get("summary"), str)):
        return Check(NAME, REVIEW, f"MIA job failed (exit status {done.returncode}, no "
                     "result); reviewers judge the model without it.",
                     details={"state": "error"})
    raw = result.get("metrics")
    metrics: dict[str, Any] = raw if isinstance(raw, dict) else {}
    return Check(NAME, _OUTCOMES[result["outcome"]], result["summary"][:500],
                 details={"state": "done", "metrics": {str(k)[:50]: v for k, v in
                                                       list(metrics.items())[:20]
                                                       if isinstance(v, int | float | str)}})


def start(settings: Settings, model_path: Path, kind: str, training_rows: int | None,
          record: Callable[[Check], None]) -> threading.Thread:
    """Run the job on a daemon thread; ``record`` gets its check."""
    def work() -> None:
        record(run(settings, model_path, kind, training_rows))

    thread = threading.Thread(target=work, name="airlock-mia", daemon=True)
    thread.start()
    return thread
