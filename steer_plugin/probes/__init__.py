"""Linear probes on the residual stream: the file format (format.py) and per-request aggregates (aggregate.py)."""
