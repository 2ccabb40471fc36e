"""Benchmarks: bare Envoy vs Envoy + Atlas (`python -m bench`; see `bench/__main__.py`)."""
