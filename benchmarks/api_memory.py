#!/usr/bin/env python
"""Memory the API process spends on its SAE catalog: peak RSS growth while SteeringService is built.

    python benchmarks/api_memory.py                      # d_model 2048 x 65536 features, fp32 (~1 GiB of weights)
    python benchmarks/api_memory.py --d-model 64 --d-sae 4096 --dir /tmp/x   # seconds

Writes a synthetic SAELens folder (cfg.json + sae_weights.safetensors: W_enc, W_dec, b_enc, b_dec; the weights are
zeros written as a sparse file, so writing it takes no time or disk) and, in a fresh Python process per case,
imports steer_plugin.service, reads VmHWM/VmRSS (/proc/self/status), builds the service and reads them again:

  - headers: SteeringService(config), as the API process builds it (SAE headers only);
  - weights: SteeringService(config, load_assets(config)), what it built before it read headers (every SAE's
             weights loaded to resolve names).

Prints one JSON line per case and deletes the folder afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {
    "headers": "SteeringService(config)",
    "weights": "SteeringService(config, load_assets(config))",
}

_CHILD = """
import json, sys
from steer_plugin.catalog import load_assets
from steer_plugin.config import parse_config
from steer_plugin.service import SteeringService

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS")}

config = parse_config({"saes": [{"id": "big", "path": sys.argv[1]}]})
before = status()
service = %s
after = status()
assert service.catalog.saes["big"].d_sae == int(sys.argv[2])
print(json.dumps({"before": before, "after": after}))
"""


def write_saelens(folder: Path, d_model: int, d_sae: int, layer: int = 3) -> int:
    """An SAELens folder whose tensors are all zeros (a sparse file); its weight file's size in bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "d_in": d_model,
        "d_sae": d_sae,
        "architecture": "standard",
        "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post", "sae_lens_version": "6.0.0"},
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    shapes = {"W_enc": [d_model, d_sae], "W_dec": [d_sae, d_model], "b_enc": [d_sae], "b_dec": [d_model]}
    header, offset = {}, 0
    for name, shape in shapes.items():  # the safetensors layout: u64 header length, JSON header, raw data
        size = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = folder / "sae_weights.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return path.stat().st_size


def measure(case: str, folder: Path, d_sae: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD % CASES[case], str(folder), str(d_sae)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sample = json.loads(out.strip().splitlines()[-1])
    before, after = sample["before"], sample["after"]
    return {
        "case": case,
        "peak_growth_mib": round((after["VmHWM"] - before["VmHWM"]) / 2**20, 1),
        "rss_growth_mib": round((after["VmRSS"] - before["VmRSS"]) / 2**20, 1),
        "rss_after_mib": round(after["VmRSS"] / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--dir", help="where to write the SAE (default: a temporary folder)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="api-memory-"))
    folder = root / "big-sae"
    try:
        size = write_saelens(folder, args.d_model, args.d_sae)
        print(json.dumps({"d_model": args.d_model, "d_sae": args.d_sae, "file_mib": round(size / 2**20, 1)}))
        for case in args.cases:
            print(json.dumps(measure(case, folder, args.d_sae)), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
