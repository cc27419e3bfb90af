"""The `spe` command for operators."""
