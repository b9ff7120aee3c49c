#!/usr/bin/env bash
# Installs the real OpenFeature clients the client tests drive, into the build
# folder (target/clients/), once: the Python SDK with its OFREP provider from
# PyPI, and the JavaScript server SDK with its OFREP provider from npm.
# Versions are pinned here so a client release cannot change a test's meaning.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(cd "$here/../.." && pwd)/target/clients"

py="$out/python"
if [ ! -f "$py/.installed" ]; then
  rm -rf "$py" && mkdir -p "$py"
  python3 -m pip install --quiet --disable-pip-version-check --target "$py" \
    "openfeature-sdk==0.10.0" "openfeature-provider-ofrep==0.3.0"
  touch "$py/.installed"
fi

js="$out/js"
if [ ! -f "$js/.installed" ]; then
  rm -rf "$js" && mkdir -p "$js"
  cp "$here/package.json" "$js/package.json"
  npm install --silent --no-audit --no-fund --prefix "$js"
  touch "$js/.installed"
fi
echo "clients installed in $out" >&2
