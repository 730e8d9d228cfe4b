"""Worker-side steering: per-layer banks, per-token tables and the graph-safe custom op."""
