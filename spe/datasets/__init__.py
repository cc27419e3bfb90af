"""Datasets: OMOP CDM 5.4 specification, synthetic generator, ingest and registry."""
