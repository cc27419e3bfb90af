"""The SPE engine: DP queries, budget ledger, airlock, audit, datasets, storage, API and CLI."""

__version__ = "0.1.0"
