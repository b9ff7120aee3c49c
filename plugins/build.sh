#!/usr/bin/env bash
# Builds every guest component in this workspace for wasm32-wasip2 (installing
# the target if it is missing) and copies them to the host workspace's target/:
#   target/plugins/<name>.wasm          the example targeting rules
#   target/plugin-fixtures/<name>.wasm  purpose-built components for tests and benches
# The file name is the plugin's name (percentage_rollout.wasm -> percentage-rollout.wasm).
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
echo "build.sh: plugins in $root/target/plugins, fixtures in $root/target/plugin-fixtures" >&2
