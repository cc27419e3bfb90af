"""``%%dp``: a DP query as a notebook cell.

Load it once per notebook (the workspace runtime loads it in every kernel)::

    %load_ext spe.client.magic

then write SQL in a cell (``%%spe_sql`` is the same magic)::

    %%dp --epsilon 0.2 --out by_gender
    SELECT gender_concept_id, COUNT(*) AS n FROM person GROUP BY 1

The cell shows the noisy table, what it cost and what remains of the permit's budget, and
leaves the DataFrame in ``by_gender`` (and always in ``dp_last``). ``--dry-run`` prices the
query without running it (free). The connection is :func:`spe.client.connect` (the
workspace's environment); errors are the API's problems, shown without a traceback.
"""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from spe.client import Client, SPEClientError, connect, describe


@magics_class
class DPMagics(Magics):
    """The ``%%dp`` cell magic (see module docstring)."""

    client: Client | None = None

    def _client(self) -> Client:
        if self.client is None:
            self.client = connect()
        return self.client

    @magic_arguments()
    @argument("--epsilon", "-e", type=float, default=None,
              help="privacy cost of this query (default: the permit's per-query default)")
    @argument("--delta", type=float, default=None, help="delta of this query")
    @argument("--out", "-o", default=None, help="variable that receives the DataFrame")
    @argument("--dry-run", action="store_true", help="price the query without running it")
    @argument("--max-rows-per-person", type=int, default=None,
              help="rows one person contributes per group (default: the dataset's)")
    @cell_magic
    def dp(self, line: str, cell: str) -> Any:
        args = parse_argstring(self.dp, line)
        sql = cell.strip()
        if not sql:
            print("%%dp: write a SQL query in the cell")
            return None
        options: dict[str, Any] = {}
        if args.delta is not None:
            options["delta"] = args.delta
        if args.max_rows_per_person is not None:
            options["max_rows_per_person"] = args.max_rows_per_person
        client = self._client()
        try:
            if args.dry_run:
                priced = client.cost(sql, args.epsilon, **options)
                cost = priced.get("cost", {})
                print(f"dry run (free): this query would cost epsilon "
                      f"{cost.get('epsilon')} and delta {cost.get('delta')}")
                return priced
            df = client.sql(sql, args.epsilon, **options)
        except SPEClientError as err:
            print(f"%%dp refused: {err}")
            return None
        self.shell.user_ns["dp_last"] = df  # type: ignore[union-attr]
        if args.out:
            if not args.out.isidentifier():
                print(f"%%dp: --out must be a Python name, not {args.out!r}")
            else:
                self.shell.user_ns[args.out] = df  # type: ignore[union-attr]
        display(df)
        print(_summary(df))
        return None  # displayed above (not twice); the DataFrame is in --out and `dp_last`


def _summary(df: Any) -> str:
    """Accuracy, cost and the remaining budget (the table itself is displayed above)."""
    lines = describe(df).split("\n\n", 1)[-1].splitlines()
    budget = df.attrs.get("budget") or {}
    remaining = budget.get("epsilon_remaining")
    if isinstance(remaining, int | float):
        lines.append(f"budget left: epsilon {remaining:.4g}")
    return "\n".join(lines)


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(DPMagics)
    ipython.magics_manager.register_alias("spe_sql", "dp", "cell")
