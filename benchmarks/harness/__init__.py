"""What the server benchmarks share (serve_bench.py, profile_worker.py; sched_probe.py takes the environment):

  - servers.py: the server kinds, their environment (`server_env`) and command (`ServerSpec`), start side by side
                on free loopback ports, /health, stop (the whole process group; `stop_all` on the way out);
  - load.py:    the load generator: streaming completions `concurrency` at a time, TTFT, inter-chunk gaps,
                tokens/s (`run_requests`, `LoadStats`), and one non-streaming completion (`complete`);
  - cpu.py:     the CPU monitor: cores used by processes other than ours around a unit, waiting for quiet.

The benchmarks import it as `harness` (they run as scripts, with benchmarks/ first on sys.path).
"""
