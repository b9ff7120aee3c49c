#!/usr/bin/env bash
# Installs the real OpenFeature clients the client tests drive, into the build
# folder (target/clients/), once: the Python SDK with its OFREP provider from
# PyPI, and the JavaScript server SDK with its OFREP provider from npm; and
# the Prometheus project's Python client, whose text parser reads /metrics.
# Versions are pinned here so a client release cannot change a test's meaning.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(cd "$here/../.." && pwd)/target/clients"

py="$out/python"
# NB: the marker holds what was installed, so a changed pin reinstalls.
py_pins="openfeature-sdk==0.10.0 openfeature-provider-ofrep==0.3.0 prometheus-client==0.26.0"
if [ "$(cat "$py/.installed" 2>/dev/null)" != "$py_pins" ]; then
  rm -rf "$py" && mkdir -p "$py"
  # shellcheck disable=SC2086
  python3 -m pip install --quiet --disable-pip-version-check --target "$py" $py_pins
  printf '%s' "$py_pins" > "$py/.installed"
fi

js="$out/js"
if [ ! -f "$js/.installed" ]; then
  rm -rf "$js" && mkdir -p "$js"
  cp "$here/package.json" "$js/package.json"
  npm install --silent --no-audit --no-fund --prefix "$js"
  touch "$js/.installed"
fi
echo "clients installed in $out" >&2
