"""Privacy budget ledger: reserve-then-run accounting per permit (see ``ledger``)."""
