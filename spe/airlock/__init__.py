"""The airlock: the only way files leave a workspace (DESIGN.md section 5, docs/airlock.md)."""
