"""DP query engine: parse, plan, mechanisms, engine."""
