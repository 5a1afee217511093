#!/usr/bin/env bash
# Installs the Debian packages the tests and bench smoke runs need: promtool, prometheus, amtool,
# prometheus-alertmanager, blackbox_exporter, systemd-analyze, ip netns, chromium (headless,
# for the HTML report test), and postgresql (the suite starts its own server, tests/pg.py).
# Idempotent and quiet unless something fails.
set -euo pipefail

packages=(prometheus prometheus-alertmanager prometheus-blackbox-exporter systemd iproute2 chromium
    postgresql)
missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
[ "${#missing[@]}" -eq 0 ] && exit 0

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { "${sudo[@]}" apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "ci-system-deps: installing ${missing[*]} failed" >&2
    exit 1
fi
