"""Researchers' enclave: sandboxed per-permit Jupyter servers, extracts and Ray."""
