#!/usr/bin/env bash
# The server tests against a NON-editable install of the built wheel (what deploy/k8s does), in its own venv.
#
# 1. .venv-wheel (or $STEER_WHEEL_VENV) with the same vLLM as .venv (scripts/_install_vllm.sh; skipped when
#    its stamp is there);
# 2. builds the wheel from a clean copy of the working tree (git's tracked + untracked-not-ignored files, so no
#    stale build/ output can end up in it) and installs it, non-editable, with its [hf,test] extras (versions
#    constrained to those of .venv when it exists);
# 3. from a scratch folder where the source tree is not importable: checks that steer_plugin, steer_adapters and
#    steer_demo resolve to the venv's site-packages, that the vLLM entry point is registered and every module
#    imports;
# 4. runs tests/integration/test_server_api.py (a copy) there, with the repo's demo assets ($STEER_ASSETS_DIR:
#    steer_demo.common derives <repo>/assets from the package's own path, which is site-packages here).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${STEER_WHEEL_VENV:-.venv-wheel}
case $VENV in /*) ;; *) VENV=$REPO/$VENV ;; esac
PY=${PYTHON:-python3}
T0=$SECONDS
say() { echo "[wheel +$((SECONDS - T0))s] $*" >&2; }

# --- 1. venv with vLLM -------------------------------------------------------------------------------------
# shellcheck source=scripts/_install_vllm.sh
. scripts/_install_vllm.sh
stamp="$VENV/.steer-vllm-$(cat scripts/_install_vllm.sh steer_adapters/vllm/vllm-versions.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  say "$VENV: vLLM already installed (stamp), skipped"
else
  say "creating $VENV"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  steer_install_vllm "$VENV" wheel
  rm -f "$VENV"/.steer-vllm-*
  touch "$stamp"
fi
VPY=$VENV/bin/python

# --- 2. build and install the wheel ------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/steer-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
    if [ -e "$f" ]; then cp -p --parents -- "$f" "$WORK/src/"; fi  # (tracked but deleted: left out)
  done
else
  cp -rp pyproject.toml README.md steer_plugin steer_adapters steer_demo tests "$WORK/src/"
  find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
fi
say "building the wheel (pip wheel --no-deps, isolated build)"
if ! "$VPY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1; then
  cat "$WORK/build.log" >&2
  exit 1
fi
whl=$(ls "$WORK/dist"/steer_plugin-*.whl)
n_py=$("$VPY" -c 'import sys, zipfile; print(sum(n.endswith(".py") for n in zipfile.ZipFile(sys.argv[1]).namelist()))' "$whl")
say "built $(basename "$whl"): $n_py .py files"
# The dev venv's versions, when there is one: the demo assets' fingerprint includes the versions of the libraries
# that built them (steer_demo.common.BUILD_PACKAGES), so other versions here would rebuild the assets.
constraints=()
DEV_PY=$REPO/${STEER_VENV:-.venv}/bin/python
if [ -x "$DEV_PY" ]; then
  "$DEV_PY" -m pip list -q --format=freeze --exclude-editable >"$WORK/constraints.txt" 2>/dev/null
  constraints=(-c "$WORK/constraints.txt")
fi
say "installing it (non-editable) with [hf,test]${constraints:+ (versions as in $DEV_PY)}"
"$VPY" -m pip uninstall -q -y steer-plugin 2>/dev/null || true
"$VPY" -m pip install -q "$whl[hf,test]" "${constraints[@]}"
steer_drop_cuda_extras "$VENV"

# --- 3. the installed package, seen from outside the source tree ------------------------------------------
cp -rp "$WORK/src/tests" "$WORK/run/tests"
cat >"$WORK/run/pytest.ini" <<'EOF'
[pytest]
markers =
    engine: starts a real vLLM engine (slow)
    server: starts a real vLLM OpenAI server (slow)
EOF
cd "$WORK/run"
unset PYTHONPATH
export STEER_ASSETS_DIR=${STEER_ASSETS_DIR:-$REPO/assets}
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_NUM_OF_RESERVED_CPU=0
say "checking the install (from $PWD)"
"$VPY" - <<'EOF'
import importlib
import importlib.metadata as md
import json
import pkgutil
import sysconfig
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"]).resolve()
for name in ("steer_plugin", "steer_adapters", "steer_demo"):
    pkg = importlib.import_module(name)
    where = Path(pkg.__file__).resolve()
    assert where.is_relative_to(site), f"{name} imported from {where}, not from the wheel install in {site}"
    print(f"  {name}: {where}")
direct = json.loads(md.distribution("steer-plugin").read_text("direct_url.json") or "{}")
assert not direct.get("dir_info", {}).get("editable"), f"an editable install: {direct}"
eps = {ep.name: ep.value for ep in md.entry_points(group="vllm.general_plugins")}
assert eps.get("steer_plugin") == "steer_adapters.vllm.plugin:register", eps
count = 0
for name in ("steer_plugin", "steer_adapters", "steer_demo"):
    pkg = importlib.import_module(name)
    for mod in pkgutil.walk_packages(pkg.__path__, prefix=name + "."):
        importlib.import_module(mod.name)
        count += 1
print(f"  entry point registered; all {count} modules import")
EOF
say "demo assets in $STEER_ASSETS_DIR (built if missing)"
"$VPY" -m steer_demo.build_assets

# --- 4. the server tests ------------------------------------------------------------------------------------
say "running the server tests against the wheel install"
"$VPY" -m pytest -p no:cacheprovider -m server tests/integration/test_server_api.py "$@"
say "done: wheel install OK"
