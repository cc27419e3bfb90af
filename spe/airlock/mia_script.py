"""Membership-inference job, run by the SACRO-ML environment's interpreter (not the SPE's).

Contract: reads one JSON job from stdin (``model_path``, ``kind``, ``training_rows``,
``data_path`` or null) and writes one JSON result to stdout: ``{"outcome": "pass" | "fail" |
"needs_review", "summary": str, "metrics": {...}}``. It imports only the standard library and
SACRO-ML (``sacroml``), so it runs in that separate environment; the SPE never imports it.

SACRO-ML's attacks need the target's training and held-out rows next to the model. The
airlock does not yet hand those rows to the job (``data_path`` is null): until it does, the
job checks that SACRO-ML is importable and answers ``needs_review`` saying the attack could
not run, so no model is ever passed on a job that did not attack it.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    job = json.load(sys.stdin)
    try:
        import sacroml  # noqa: F401 - present in the configured environment only
    except ImportError:
        print(json.dumps({"outcome": "needs_review", "summary": "MIA not run: SACRO-ML is not "
                          "installed in the configured environment.", "metrics": {}}))
        return 0
    if not job.get("data_path"):
        print(json.dumps({"outcome": "needs_review", "summary": "MIA not run: the training "
                          "and held-out rows were not provided to the attack.", "metrics": {}}))
        return 0
    print(json.dumps({"outcome": "needs_review", "summary": "MIA not run: this job runner "
                      "does not load data sets yet.", "metrics": {}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
