"""Shared helpers for the demo-asset build: paths, stage markers, progress output.

Every stage writes its outputs first and a small JSON marker last (``<assets>/.build/<stage>.json``).
A stage is skipped only when its marker exists, records the same parameters, was built on top of
the same upstream markers, and all of its outputs are still on disk; so an interrupted stage, a
changed parameter, or a rebuilt upstream stage all trigger a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

#: ``<repo>/steer_demo/common.py`` -> the repository root is the folder holding the package.
REPO_ROOT = Path(__file__).resolve().parents[1]
ENV_ASSETS_DIR = "STEER_ASSETS_DIR"

MODEL_DIRNAME = "SmolLM2-135M-Instruct"
SAE_RELDIR = "sae/smollm2-135m-res-l15-topk"
WORK_DIRNAME = "work"  # intermediate files (corpus, activations)
MARKER_DIRNAME = ".build"

# ---- build parameters (part of the stage fingerprints) ----
LAYER = 15  # blocks.15.hook_resid_post == HF hidden_states[16]
HOOK_NAME = f"blocks.{LAYER}.hook_resid_post"
NEURONPEDIA_ID = f"smollm2-135m/{LAYER}-res-topk"
SEED = 1234


#: Libraries whose behaviour the built bytes depend on (GGUF dequantisation, tokenizer, numerics, file
#: writing); their installed versions are part of the first stage's fingerprint, so every stage rebuilds
#: when one changes. transformers, tokenizers, gguf and accelerate are pinned in pyproject.toml's `hf`
#: extra, torch by scripts/setup.sh.
BUILD_PACKAGES = ("torch", "transformers", "tokenizers", "gguf", "accelerate", "safetensors", "numpy")

#: Keys holding wall-clock measurements. They are kept in the stage markers (``.build/*.json``) and left
#: out of every built file, so rebuilds are byte-identical.
TIMING_KEYS = frozenset(
    {"seconds", "stage_seconds", "harvest_seconds", "train_seconds", "training_seconds", "elapsed_s",
     "tokens_per_second"}
)  # fmt: skip


def package_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_env() -> dict[str, Any]:
    """Python version and versions of ``BUILD_PACKAGES`` (cheap: read from package metadata, nothing imported)."""
    import platform

    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        **{name: package_version(name) for name in BUILD_PACKAGES},
    }


def without_timings(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts/lists) without the ``TIMING_KEYS``."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def default_assets_dir() -> Path:
    env = os.environ.get(ENV_ASSETS_DIR)
    if env:
        return Path(env).expanduser().resolve()
    return REPO_ROOT / "assets"


def log(msg: str) -> None:
    print(msg, flush=True)


def fmt_s(seconds: float) -> str:
    return f"{seconds:.1f}s"


class Progress:
    """Periodic one-line progress reports (works in logs and terminals alike, no tty tricks)."""

    def __init__(self, label: str, total: int | None = None, unit: str = "it", every_s: float = 5.0):
        self.label = label
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.last = self.t0
        self.n = 0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(extra)

    def _print(self, extra: str = "") -> None:
        el = time.monotonic() - self.t0
        rate = self.n / el if el > 0 else 0.0
        tot = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f" {extra}" if extra else ""
        log(
            f"  [{self.label}] {self.n}{tot} {self.unit}{pct} {fmt_s(el)} elapsed, {rate:.0f} {self.unit}/s{tail}"
        )

    def done(self, extra: str = "") -> float:
        self._print(extra)
        return time.monotonic() - self.t0


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Atomic JSON write (tmp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Stage:
    """Marker bookkeeping for one build stage."""

    def __init__(
        self, assets: Path, name: str, params: dict[str, Any], outputs: list[Path], deps: list[Stage]
    ):
        self.assets = assets
        self.name = name
        self.params = params
        self.outputs = outputs
        self.deps = deps
        self.marker = assets / MARKER_DIRNAME / f"{name}.json"

    def key(self) -> str:
        return fingerprint({"params": self.params, "deps": [d.marker_key() for d in self.deps]})

    def marker_key(self) -> str | None:
        if not self.marker.is_file():
            return None
        try:
            return read_json(self.marker).get("key")
        except (OSError, ValueError):
            return None

    def is_done(self) -> bool:
        if not all(d.is_done() for d in self.deps):
            return False
        return self.marker_key() == self.key() and all(p.exists() for p in self.outputs)

    def invalidate(self) -> None:
        if self.marker.exists():
            self.marker.unlink()

    def finish(self, info: dict[str, Any]) -> None:
        write_json(self.marker, {"stage": self.name, "key": self.key(), "params": self.params, **info})

    def info(self) -> dict[str, Any]:
        return read_json(self.marker) if self.marker.is_file() else {}


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def pick_threads(verbose: bool = False) -> int:
    """Set torch's intra-op threads to whichever of 1 .. all cores runs a typical matmul fastest now.

    On a 2-core box shared with other work, 2 OpenMP threads can be 3-5x slower than 1 (each barrier
    waits for the thread that lost its core), so this is measured, not assumed. Takes ~0.1-0.3 s.
    """
    import torch

    n_max = cpu_count()
    if n_max == 1:
        torch.set_num_threads(1)
        return 1
    a = torch.randn(512, 576)
    b = torch.randn(576, 4608)
    best, best_t = n_max, float("inf")
    for n in sorted({1, n_max}, reverse=True):
        torch.set_num_threads(n)
        a @ b
        t = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            t = min(t, time.perf_counter() - t0)
        if t < best_t * 0.9:  # prefer more threads unless fewer is clearly faster
            best, best_t = n, t
    torch.set_num_threads(best)
    if verbose:
        log(f"  using {best} torch thread(s) of {n_max} (measured)")
    return best


ENV_WORKERS = "STEER_BUILD_WORKERS"


def build_workers() -> int:
    """Processes for the build's parallel stages: ``$STEER_BUILD_WORKERS``, else every core this process may
    use. Each runs one torch thread on whole work units, so the results do not depend on this number."""
    mode = os.environ.get(ENV_WORKERS, "").strip()
    return max(1, int(mode)) if mode else cpu_count()


ENV_THREADS = "STEER_BUILD_THREADS"


def configure_threads(verbose: bool = False) -> int:
    """Torch intra-op threads for the build: ``$STEER_BUILD_THREADS`` = ``1`` (default), a number, or ``auto``.

    The default is 1 thread: results are then bit-for-bit reproducible on a given CPU type (thread count
    changes floating-point summation order, which changes sampled generations and, through them, the whole
    corpus), and on the 2-core demo box shared with other work one thread is also the fastest choice
    most of the time. ``auto`` measures 1 vs all cores before each stage (and periodically inside long
    loops) and takes the faster: quicker on an idle machine, not reproducible.
    """
    import torch

    mode = os.environ.get(ENV_THREADS, "1").strip().lower()
    if mode == "auto":
        return pick_threads(verbose)
    n = max(1, int(mode))
    torch.set_num_threads(n)
    if verbose:
        log(f"  using {n} torch thread(s) (${ENV_THREADS}={mode})")
    return n


def python_exe() -> str:
    return sys.executable
