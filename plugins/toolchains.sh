#!/usr/bin/env bash
# Installs the component toolchains for targeting rules written in Python and
# JavaScript into the build folder (target/toolchains/), once per pinned
# version: componentize-py from PyPI (python/requirements.txt) and
# componentize-js from npm (js/package.json with its lock file, `npm ci`).
# build.sh uses them when they are there. CI runs this; so can you.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(dirname "$here")/target/toolchains"
mkdir -p "$out"
# NB: one install at a time: test binaries run this side by side.
exec 9>"$out/.lock"
flock 9

stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }

py="$out/python"
want="$(stamp "$here/python/requirements.txt")"
if [ "$(cat "$py/.installed" 2>/dev/null)" != "$want" ]; then
  rm -rf "$py" && mkdir -p "$py"
  python3 -m pip install --quiet --disable-pip-version-check --target "$py" \
    -r "$here/python/requirements.txt"
  echo "$want" > "$py/.installed"
fi

js="$out/js"
want="$(stamp "$here/js/package.json" "$here/js/package-lock.json")"
if [ "$(cat "$js/.installed" 2>/dev/null)" != "$want" ]; then
  rm -rf "$js" && mkdir -p "$js"
  cp "$here/js/package.json" "$here/js/package-lock.json" "$js/"
  npm ci --silent --no-audit --no-fund --prefix "$js"
  echo "$want" > "$js/.installed"
fi
echo "toolchains.sh: componentize-py and componentize-js in $out" >&2
