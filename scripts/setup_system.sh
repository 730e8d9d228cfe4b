#!/usr/bin/env bash
# Debian packages the browser and Prometheus tests need, installed only when missing: Chromium and its driver
# (tests/integration/test_playground.py), Prometheus with promtool (tests/integration/test_prometheus.py and
# the rules check), iproute2 (tests/integration/netns.py: `ip netns`). Needs root (or sudo) and apt; elsewhere it says what is missing and leaves the rest alone:
# those tests then skip, except under CI=true, where they fail and name the package.
set -euo pipefail
declare -A WANT=([chromium]=chromium [chromedriver]=chromium-driver [prometheus]=prometheus [promtool]=prometheus
  [ip]=iproute2 [unshare]=util-linux)  # ip, unshare: the multi-node tests' namespaced hosts
missing=()
for cmd in "${!WANT[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${WANT[$cmd]}")
done
# A font, so that screenshots show text on a minimal image.
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
SUDO=
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=sudo; else
    echo "[setup-system] missing Debian packages (need root to install): ${missing[*]}" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[setup-system] no apt-get here; install these yourself: ${missing[*]}" >&2
  exit 0
fi
echo "[setup-system] installing ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "[setup-system] done" >&2
