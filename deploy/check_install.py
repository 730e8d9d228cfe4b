"""Run by deploy/Dockerfile right after `pip install --no-deps` of the plugin's wheel: the image build stops here
when the plugin could not run on the base image's vLLM.

Checks, in the Python that runs it:
1. steer-plugin is installed from a wheel (not editable);
2. every runtime requirement of the wheel (extras left out) is installed in a version it accepts: the install
   skipped dependencies on purpose, so that the image's own torch stays;
3. vLLM's minor version is one the glue was checked against (STEER_ALLOW_UNCHECKED_VLLM=1 to build anyway);
4. the `vllm.general_plugins` entry point is registered (how vLLM's workers load the plugin);
5. `steer-serve` (the image's ENTRYPOINT) is on PATH, is this wheel's script, and answers --help;
6. every module of steer_plugin and steer_adapters imports against this vLLM.

tests/deploy/test_deploy_kit.py runs it, through the Dockerfile's own RUN line, in a fresh virtual environment.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

DIST = "steer-plugin"
ENTRY_POINT = ("steer_plugin", "steer_adapters.vllm.plugin:register")
CONSOLE_SCRIPT = "steer-serve"


def _checked_vllm() -> tuple[str, ...]:
    """vLLM minor versions the adapter is checked against: those of steer_adapters/vllm/vllm-versions.txt, read from
    the installed wheel (the one file that names them; tools/check_internals.py checks every internal in each)."""
    from steer_adapters.vllm.versions import checked_vllm_versions

    return tuple(dict.fromkeys(sorted(re.match(r"\d+\.\d+", v)[0] for v in checked_vllm_versions())))


CHECKED_VLLM = _checked_vllm()
"""vLLM minor versions the adapter is checked against (steer_adapters/vllm/vllm-versions.txt)."""
ALLOW_ENV = "STEER_ALLOW_UNCHECKED_VLLM"


def _requirements(dist: md.Distribution) -> list[str]:
    from packaging.requirements import Requirement

    problems = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra ([hf], [test], [bench]) or another platform
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"requirement {req} is not installed")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"requirement {req}: {version} is installed")
    return problems


def _vllm() -> list[str]:
    import vllm

    version = vllm.__version__
    print(f"check_install: vLLM {version}")
    minor = re.match(r"(\d+\.\d+)", version)
    if minor and minor[1] in CHECKED_VLLM:
        return []
    if os.environ.get(ALLOW_ENV, "0") == "1":
        print(
            f"check_install: vLLM {version} is not one the glue was checked against; {ALLOW_ENV}=1: going on"
        )
        return []
    return [
        f"vLLM {version}: the glue is checked against {', '.join(CHECKED_VLLM)} only "
        f"(build with --build-arg {ALLOW_ENV}=1 to try it anyway)"
    ]


def _entry_point() -> list[str]:
    found = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
    name, value = ENTRY_POINT
    if found.get(name) != value:
        return [f"vllm.general_plugins entry point {name} = {value} not registered (found {found})"]
    return []


def _console_script(dist: md.Distribution) -> list[str]:
    installed = [
        Path(dist.locate_file(f)).resolve() for f in dist.files or [] if Path(str(f)).name == CONSOLE_SCRIPT
    ]
    on_path = shutil.which(CONSOLE_SCRIPT)
    if not installed:
        return [f"the wheel installed no {CONSOLE_SCRIPT} script"]
    if on_path is None or Path(on_path).resolve() not in installed:
        return [f"{CONSOLE_SCRIPT} on PATH is {on_path}, not the wheel's {installed[0]}"]
    proc = subprocess.run([on_path, "--help"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or "--steer-config" not in proc.stdout:
        return [f"{CONSOLE_SCRIPT} --help failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"]
    return []


def _imports() -> list[str]:
    problems, count = [], 0
    for name in ("steer_plugin", "steer_adapters"):
        package = importlib.import_module(name)
        for module in pkgutil.walk_packages(package.__path__, prefix=name + "."):
            try:
                importlib.import_module(module.name)
                count += 1
            except Exception as err:  # report every module that fails, not only the first
                problems.append(f"import {module.name}: {type(err).__name__}: {err}")
    print(f"check_install: {count} modules import")
    return problems


def main() -> int:
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        print(f"check_install: {DIST} is not installed", file=sys.stderr)
        return 1
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    problems = []
    if direct.get("dir_info", {}).get("editable"):
        problems.append(f"{DIST} is an editable install ({direct.get('url')}), not the wheel")
    print(f"check_install: {DIST} {dist.version} in {dist.locate_file('')}")
    for check in (_requirements, _vllm, _entry_point, _console_script, _imports):
        problems += check(dist) if check in (_requirements, _console_script) else check()
    for problem in problems:
        print(f"check_install: {problem}", file=sys.stderr)
    if not problems:
        print("check_install: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
