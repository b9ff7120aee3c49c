#!/usr/bin/env bash
# Builds every guest component in this workspace for wasm32-wasip2 (installing
# the target if it is missing) and copies them to the host workspace's target/:
#   target/plugins/<name>.wasm          the example targeting rules
#   target/plugin-fixtures/<name>.wasm  purpose-built components for tests and benches
#   target/language-plugins/<name>-py.wasm, <name>-js.wasm
#                                       the rules written in Python and JavaScript
# The file name is the plugin's name (percentage_rollout.wasm -> percentage-rollout.wasm).
#
# Then the rules written in Python (python/<name>/ -> <name>-py.wasm) and
# JavaScript (js/<name>/ -> <name>-js.wasm), their fixtures in
# target/plugin-fixtures/, with the
# toolchains toolchains.sh installs into target/toolchains/: skipped, saying
# so, when those are not installed; rebuilt only when their inputs changed
# (tests call this script, several at once).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
target=wasm32-wasip2

# NB: checks the sysroot rather than asking rustup, which can answer wrongly
# while another rustup runs (tests run this script in parallel).
if [ ! -d "$(rustc --print sysroot)/lib/rustlib/$target" ]; then
  echo "build.sh: installing the $target target" >&2
  rustup target add "$target"
fi

cargo build --manifest-path "$here/Cargo.toml" --release --target "$target" --quiet

out="$here/target/$target/release"
mkdir -p "$root/target/plugins" "$root/target/plugin-fixtures"
for dir in "$here"/*/ "$here"/fixtures/*/; do
  # Only component crates (cdylib); fixture-rule is a helper library.
  grep -q cdylib "$dir/Cargo.toml" 2>/dev/null || continue
  name="$(basename "$dir")"
  case "$dir" in
    */fixtures/*) dest="$root/target/plugin-fixtures" ;;
    *) dest="$root/target/plugins" ;;
  esac
  cp "$out/${name//-/_}.wasm" "$dest/$name.wasm"
done

tools="$root/target/toolchains"
wit="$root/wit"
# What each build was made from, and what it printed.
builds="$root/target/plugin-builds"
mkdir -p "$builds" "$root/target/language-plugins"

# build_if_changed OUT INPUT_DIR... -- COMMAND...: runs COMMAND unless OUT
# exists and was built from the same inputs (file contents, the contract,
# the toolchain's version), as recorded beside it.
build_if_changed() {
  local out="$1"; shift
  local inputs=()
  while [ "$1" != "--" ]; do inputs+=("$1"); shift; done
  shift
  local stamp="$builds/$(basename "$out").inputs" log="$builds/$(basename "$out").log"
  local want
  want="$( (find "${inputs[@]}" "$wit" -type f \( -name '*.py' -o -name '*.js' -o -name '*.wit' \) \
            -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum;
          cat "$tools"/*/.installed) | sha256sum | cut -c1-64)"
  if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  echo "build.sh: building $(basename "$out")" >&2
  "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "build.sh: building $(basename "$out") failed" >&2; return 1; }
  echo "$want" > "$stamp"
}

componentize_py="$tools/python/bin/componentize-py"
componentize_js="$tools/js/node_modules/.bin/componentize-js"
(
  # NB: one build of these at a time: tests run this script side by side.
  flock 9
  if [ -x "$componentize_py" ]; then
    for dir in "$here"/python/*/ "$here"/python/fixtures/*/; do
      [ -f "$dir/app.py" ] || continue
      name="$(basename "$dir")"
      case "$dir" in
        */fixtures/*) dest="$root/target/plugin-fixtures/$name.wasm" ;;
        *) dest="$root/target/language-plugins/$name-py.wasm" ;;
      esac
      # NB: the default build, no --stub-wasi: flaghost answers the WASI
      # calls Python's runtime makes.
      build_if_changed "$dest" "$dir" "$here/python/lib" -- \
        env PYTHONPATH="$tools/python" "$componentize_py" -d "$wit" \
          -w flaghost:rules/targeting-rule@0.1.0 componentize \
          -p "$dir" -p "$here/python/lib" app -o "$dest"
    done
  else
    echo "build.sh: skipped the Python rules: componentize-py is not installed (run plugins/toolchains.sh)" >&2
  fi
  if [ -x "$componentize_js" ]; then
    for dir in "$here"/js/*/ "$here"/js/fixtures/*/; do
      [ -f "$dir/rule.js" ] || continue
      name="$(basename "$dir")"
      case "$dir" in
        */fixtures/*) dest="$root/target/plugin-fixtures/$name.wasm" ;;
        *) dest="$root/target/language-plugins/$name-js.wasm" ;;
      esac
      # NB: the default build, no --disable: flaghost answers the WASI calls
      # the JavaScript runtime makes.
      build_if_changed "$dest" "$dir" "$here/js/flaghost-rule.js" -- \
        "$componentize_js" "$dir/rule.js" -w "$wit" -n targeting-rule -o "$dest"
    done
  else
    echo "build.sh: skipped the JavaScript rules: componentize-js is not installed (run plugins/toolchains.sh)" >&2
  fi
) 9>"$builds/.lock"

echo "build.sh: plugins in $root/target/plugins and target/language-plugins, fixtures in target/plugin-fixtures" >&2
