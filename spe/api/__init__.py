"""The SPE HTTP API: one FastAPI app composed of the packages' routers."""
