"""The walkthrough, once: its steps, their prose, the code they run and their screenshots.

``docs/walkthrough.md`` is generated from :data:`STEPS` (``python -m tests.e2e.walkthrough_steps
--write``; ``tests/unit/test_walkthrough_doc.py`` fails when the checked-in page differs), and
``tests/e2e/test_walkthrough_browser.py`` runs every step marked ``tested`` in this order: the
notebook cells it types into JupyterLab are the :data:`CELLS` shown on the page, the permit it
issues is :func:`permit_body`, the screenshots it takes are the ``shots`` named here. Changing a
step therefore changes both, and a step the test does not run is shown as such on the page.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[2] / "docs" / "walkthrough.md"
IMG = "img/walkthrough"  # relative to docs/

#: The permit the access body issues (dates are the test's own; the page shows these).
PERMIT: dict[str, Any] = {
    "reference": "0001/2026/FI", "title": "Diabetes cohort",
    "holder": {"organisation": "Uni", "principal_investigator": "Dr PI"},
    "purposes": ["scientific_research"],
    "purpose_justification": "Onset of type 2 diabetes by sex",
    "datasets": [{"dataset": "demo",
                  "tables": {"person": ["person_id", "year_of_birth", "gender_concept_id"],
                             "condition_occurrence": ["person_id", "condition_concept_id"],
                             "concept": ["concept_id", "concept_name"]}}],
    "persons": ["alice"],
    "valid_from": "2026-01-01T00:00:00Z", "valid_until": "2026-12-31T00:00:00Z",
    "privacy_budget": {"epsilon": 5, "delta": 1e-6, "max_epsilon_per_query": 1},
    "compute_quota": {"cpus": 1, "memory_mb": 3072, "disk_mb": 1024, "gpus": 1},
}


def permit_body(valid_from: str | None = None, valid_until: str | None = None
                ) -> dict[str, Any]:
    """:data:`PERMIT`, with other validity dates when given (the test's are around today)."""
    body = json.loads(json.dumps(PERMIT))
    body["valid_from"] = valid_from or body["valid_from"]
    body["valid_until"] = valid_until or body["valid_until"]
    return dict(body)


#: Notebook cells, in the order the researcher runs them.
CELLS: dict[str, str] = {
    "client": """\
from spe import client

spe = client.connect()  # SPE_API_URL, SPE_TOKEN_FILE and SPE_PERMIT_ID are set
by_gender = spe.sql("SELECT gender_concept_id, COUNT(*) AS n FROM person "
                    "GROUP BY gender_concept_id", epsilon=0.5)
print(client.describe(by_gender))
spe.budget()""",
    "magic": """\
%%dp --epsilon 0.5 --out top_conditions
SELECT c.concept_name, COUNT(*) AS n
FROM condition_occurrence o JOIN concept c ON c.concept_id = o.condition_concept_id
GROUP BY c.concept_name""",
    "plot": """\
ax = by_gender.plot.bar(x="gender_concept_id", y="n", legend=False,
                        title="Persons by gender concept (DP, epsilon 0.5)")""",
    "ray": """\
import ray

client.ray()  # this workspace's own Ray head: the permit's CPUs and GPUs, nothing else


@ray.remote(num_gpus=1)
def share_of(n, total):
    return round(max(n, 0) / total, 3), ray.get_gpu_ids()


total = int(by_gender["n"].sum())
print(ray.get([share_of.remote(int(n), total) for n in by_gender["n"]]))
print({k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})""",
    "export": """\
client.save_release(by_gender, "by_gender.csv")  # the exact bytes the DP receipt signs
dp_table = spe.export("by_gender.csv", "Table 1: persons by gender (DP)",
                      receipts=[by_gender.attrs["receipt"]])
print("by_gender.csv:", dp_table["state"])

with open("site_counts.csv", "w") as fh:  # counted by hand: 3 is below the minimum of 10
    fh.write("site,n\\nnorth,3\\nsouth,41\\n")
site_counts = spe.export("site_counts.csv", "Counts per site")
print("site_counts.csv:", site_counts["state"])""",
}


@dataclass(frozen=True)
class Shot:
    name: str  # file name without .png, under docs/img/walkthrough/ and the test's artefacts
    caption: str


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    text: str
    code: tuple[tuple[str, str], ...] = ()  # (language, source) blocks after the text
    after: str = ""
    shots: tuple[Shot, ...] = ()
    tested: bool = True


def _curl_permit() -> str:
    body = json.dumps(PERMIT, indent=2)
    return (
        "TOKEN=$(curl -s -d grant_type=client_credentials -d client_id=hdab-alpha \\\n"
        "  -d client_secret=hdab-alpha-dev-secret \\\n"
        "  http://127.0.0.1:8180/realms/spe/protocol/openid-connect/token | jq -r .access_token)\n"
        "curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' \\\n"
        f"  http://127.0.0.1:8600/v1/permits -d '{body}' | jq .id")


STEPS: tuple[Step, ...] = (
    Step("up", "Start the SPE", tested=False, text="""\
Everything below runs on one machine, as root (the workspace sandboxes need it), after
`scripts/setup.sh` (Python venv, `npm install --prefix .` for configurable-http-proxy, and the
workspace runtime `python -m workspaces.runtime build var/runtime`).""",
         code=(("sh", ".venv/bin/spe up\n# on a machine without a GPU (the permit below asks for "
                      "one):\nSPE_WS_GPU_INDICES='[0]' .venv/bin/spe up"),),
         after="""\
`spe up` starts the bundled Keycloak (realm `spe`, dev users), the API with the console and
JupyterHub with its proxy, and prints each URL. The hub's state database, cookie secret and
auth-state key are in `var/hub` (0700); no workspace can see them. (The test starts the same
pieces on ports of its own: Keycloak from `scripts/services.sh`, the API and the hub from
`tests/e2e/stack.py`, and a smaller copy of the bundled synthetic dataset.)"""),
    Step("permit", "An access body grants a permit naming the researcher", text="""\
The access body `hdab-alpha` authenticates with client credentials and issues a permit naming
`alice` (dev secrets from `infra/keycloak/README.md`). Its compute quota asks for one GPU: on a
machine without GPUs the hub hands out a configured index (`SPE_WS_GPU_INDICES`) and Ray's
*logical* GPU stands in for it, which is what the test does.""",
         code=(("sh", _curl_permit()),)),
    Step("login", "alice logs in through Keycloak", text="""\
Open <http://127.0.0.1:8000/hub/login>, choose *Sign in with SPE (Keycloak)* and log in as
`alice` / `alice-dev-password`. Only users with the realm role `researcher` get in (`hadmin`,
`op` and the access bodies are refused).""",
         shots=(Shot("keycloak-login", "Keycloak's login form, opened by the hub"),
                Shot("hub-home", "The hub's home page after the login"))),
    Step("start", "alice starts the permit's workspace", text="""\
*Start My Server* opens the list of the permits naming alice: each permit has one named server,
`p` + the first 29 hex digits of the permit id. She picks the permit and presses *Start*.

* The server starts in a few seconds inside its sandbox: its own Unix account, its own network
  namespace (it reaches only the hub and the SPE API), cgroup limits from the permit's compute
  quota, and no view of other workspaces, the dataset store or any secret.
* The home (and `/tmp`) is its own ext4 filesystem of the quota's `disk_mb`: an image file in
  the workspace directory, mounted through a loop device while the server runs. Writing past
  the quota fails with "No space left on device"; `df -h ~` shows what is left.
* The workspace opens on its own web origin,
  `http://<server>--alice.localhost:8000/user/alice/<server>/lab` (every browser resolves
  `*.localhost` to this machine): a page served from one workspace cannot read the hub or any
  other workspace. Between the browser and every server sits the *browser gate*
  (`workspaces.browser_gate`): JupyterLab offers no *Download*, the gate refuses the download
  routes anyway, everything a workspace sends to browsers counts against a daily budget
  (`SPE_WS_BROWSER_BUDGET_BYTES`) and uploads are audited and limited. Results leave only
  through the airlock.""",
         shots=(Shot("spawn-permits", "The permits naming alice, one workspace each"),
                Shot("spawn-form", "The permit's server, ready to start"),
                Shot("lab", "JupyterLab in the workspace, on its own origin"))),
    Step("client", "A DP query with the Python client", text="""\
In a new notebook (the `%%dp` magic is loaded in every kernel):""",
         code=(("python", CELLS["client"]),),
         after="""\
The answer is a DataFrame with noise added; `client.describe` shows each noisy column's
mechanism and 95% interval and the cost; `spe.budget()` shows (and plots) what is left of the
permit's privacy budget.

The notebook never holds a Keycloak token: the client sends a short-lived SPE workspace token
bound to (alice, permit, workspace) and to the workspace's network address, refused as soon as
the permit or the workspace ends. The hub writes a fresh one to `~/.spe/token` every third of
its lifetime and the client reads the newest on every call, so a notebook open all day never
sees "token expired".""",
         shots=(Shot("notebook-client", "A DP query through the client, and the budget"),)),
    Step("magic", "The same as a cell: the `%%dp` magic", text="""\
A cell that starts with `%%dp` is a DP query; it shows the table, its accuracy, the cost and
what is left, and `--out` keeps the DataFrame:""",
         code=(("sql", CELLS["magic"]),),
         after="""\
`concept` is public reference data (the OMOP vocabulary, declared public): it joins on its key
and adds no rows, so names cost nothing extra. Tables the data holder has not declared are
refused with a message saying which declaration would allow them; see
[datasets.md](datasets.md). `--dry-run` prices a query without running it.""",
         shots=(Shot("notebook-magic", "A %%dp cell"),)),
    Step("plot", "Plot a result", text="The answers are ordinary DataFrames:",
         code=(("python", CELLS["plot"]),),
         shots=(Shot("notebook-plot", "The DP answer, plotted in the notebook"),)),
    Step("ray", "Ray in the workspace", text="""\
`client.ray()` starts this workspace's private Ray head inside its sandbox (same account,
cgroup and network namespace; token authentication on; no dashboard) with exactly the CPUs and
GPUs of the permit's quota, and connects the notebook to it. Never a cluster shared with other
workspaces.""",
         code=(("python", CELLS["ray"]),),
         after="""\
On this machine (and in CI) there is no GPU: the GPU the task asks for is Ray's logical one,
so `ray.get_gpu_ids()` names the allocated index and no device is bound. On a GPU machine the
same cell runs on the allocated card (`CUDA_VISIBLE_DEVICES`). Ray writes two harmless lines
under the cell: a hint about `ipywidgets` (not in the runtime) and a warning that it could not
reach a public address to learn its own (the sandbox has no route out; it uses loopback).""",
         shots=(Shot("notebook-ray", "A Ray task on the workspace's (logical) GPU"),)),
    Step("export", "Request the export of two tables", text="""\
Results leave only through the airlock. A table saved with `client.save_release` from a DP
answer, sent with the answer's signed receipt, is released at once: it is exactly what the
query engine already released. Anything else waits for the hospital's reviewers, after the
automated checks (here: a cell count below the permit's minimum of 10).""",
         code=(("python", CELLS["export"]),),
         after="See [airlock.md](airlock.md) for every check and the review rules.",
         shots=(Shot("notebook-export", "One table released on its receipt, one in review"),)),
    Step("review", "A hospital admin reviews the exports", text="""\
`hadmin` logs in to the console (<http://127.0.0.1:8600/console>, through Keycloak) and opens
the permit: the DP table was released on its receipt (its `dp_receipt` check passed) and no
one had to vote. The other request is in the review queue, with its failed check highlighted:
she rejects it, with a comment shared with alice. It needs a second admin's agreement: the
permit's export policy asks for two reviewers, and a request is decided only when both have
voted (the second does not see the first's vote before voting).""",
         shots=(Shot("console-dp-released", "The DP table, released on its receipt"),
                Shot("console-queue", "The review queue"),
                Shot("console-small-count", "The small count, highlighted; the first vote"),
                Shot("console-rejected", "The second admin agrees: rejected"))),
    Step("audit", "The permit's audit trail, and the chain", text="""\
From the permit's page, *This permit's audit trail* lists everything done under it (the
issue, the workspace's start and its token, each query and its charge, the exports and the
votes), oldest first. *Verify the hash chain now* recomputes the whole log's hash chain; signed
checkpoints held by the access bodies show a rewrite of the whole log too
(`spe audit verify-remote`, see [audit.md](audit.md)).""",
         shots=(Shot("console-audit-trail", "The permit's audit trail"),
                Shot("console-chain-verified", "The hash chain verified"))),
    Step("revoke", "The access body revokes the permit", text="""\
The access body revokes the permit (`POST /v1/permits/{id}/revoke` with a reason). The hub's
workspace service reads the revocation from the permit event outbox and stops alice's server,
kernels and Ray head included, within 10 seconds; the workspace's tokens are revoked at once.
From then on every use of the permit by alice is refused: queries (dry runs too), new export
requests and revisions over the API (with her Keycloak token too), starting the workspace at
the hub and its web origin. What happened stays readable to her (the budget's accounting, her
export requests and their decisions): it is the permit's record, not data.""",
         code=(("sh", "curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: "
                      "application/json' \\\n  http://127.0.0.1:8600/v1/permits/$PERMIT/revoke "
                      "-d '{\"reason\": \"project ended\"}'"),),
         after="""\
After revocation or expiry, the workspace's data is deleted when the retention period the
permit states (its `retention_days`, at most 183) has passed, to the day, with an audited
record (`workspace.data_delete`). Logging out of the hub also ends the Keycloak session.""",
         shots=(Shot("hub-after-revoke", "The hub offers no workspace any more"),)),
    Step("amend", "When a permit is amended", tested=False, text="""\
An access body amends a permit with `PATCH /v1/permits/{id}` (with `If-Match`: the permit's
ETag). The hub's workspace service reads the amendment from the permit event outbox and:

* stops the permit's server of every person the amendment removed (their tokens are already
  refused);
* rebuilds a `pseudonymised` permit's extract when its tables or columns changed, and deletes
  the extract when the access mode became `dp_only`;
* leaves a changed compute quota (CPUs, memory, GPUs, disk) to the next start: the running
  server keeps the limits it started with.

Operators and hospital admins see the workspaces and GPU allocations with
`GET /v1/workspaces` and `GET /v1/gpus`."""),
    Step("production", "In production", tested=False, text="""\
The workspaces' origins need a domain of their own, e.g. `SPE_HUB_USER_DOMAIN
=ws.spe.example.org` with the hub at `https://hub.spe.example.org` (`SPE_HUB_PUBLIC_URL`): a
wildcard DNS record `*.ws.spe.example.org` pointing at the hub machine and a wildcard
certificate for it, given to the gate as `SPE_GATE_SSL_CERT` / `SPE_GATE_SSL_KEY` (or terminate
TLS in front of the gate and keep the `Host` header). Prefer a registrable domain apart from the
hub's (or one on the Public Suffix List) so workspaces are not even same-site with each other.
The proxy itself listens on loopback only (`SPE_HUB_PROXY_PORT`, default 8002). See
[cluster.md](cluster.md) for running past one machine."""),
)

TESTED = tuple(s.key for s in STEPS if s.tested)


def render() -> str:
    """The Markdown of docs/walkthrough.md."""
    out = [
        "# Walkthrough: from a permit to its revocation",
        "",
        "<!-- Generated from tests/e2e/walkthrough_steps.py by "
        "`python -m tests.e2e.walkthrough_steps --write`; do not edit by hand. -->",
        "",
        "Each kind of user does their job on one machine: an access body issues a permit, a "
        "researcher works in her workspace (DP queries, a plot, Ray, exports), hospital admins "
        "review the exports and the audit trail, and the access body revokes the permit. The "
        "steps marked *(tested)* are run in this order, with this code, by "
        "`tests/e2e/test_walkthrough_browser.py` in a real browser (headless Chromium) against "
        "the real Keycloak, API, console and hub, in every CI run; the screenshots are what it "
        "saw (its own copies are kept under `var/artefacts/walkthrough/`).",
        "",
    ]
    for number, step in enumerate(STEPS, 1):
        mark = " *(tested)*" if step.tested else ""
        out += [f"## {number}. {step.title}{mark}", "", step.text, ""]
        for language, source in step.code:
            out += [f"```{language}", source, "```", ""]
        if step.after:
            out += [step.after, ""]
        for shot in step.shots:
            out += [f"![{shot.caption}]({IMG}/{shot.name}.png)", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        DOC.write_text(render(), encoding="utf-8")
        return 0
    if argv == ["--check"]:
        return 0 if DOC.read_text(encoding="utf-8") == render() else 1
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
