#!/usr/bin/env bash
# schemathesis against flaghost's OFREP API, checked against the OFREP
# OpenAPI file (../shared/reference/ofrep/openapi.yaml beside this repository,
# the 3.1 file; OFREP_OPENAPI overrides it).
#
# Starts target/debug/flaghost (FLAGHOST_BIN overrides; build it first with
# `cargo build -p flaghost`) on a free 127.0.0.1 port with the flag file in
# tests/schemathesis/flags/, and runs two passes:
#   1. the default environment (`/ofrep/v1/...`), every check;
#   2. environment `stale` (`/environments/stale/ofrep/v1/...`), whose flag
#      file is broken after its first load, so every value it gives is served
#      with reason STALE (README, "Stale answers").
# What flaghost answers beyond the OFREP file is told to schemathesis in
# hooks.py and schemathesis.toml, each with its reason.
#
# schemathesis is installed, pinned, into target/schemathesis-venv (reused
# while its version matches). Work files, flaghost's log and the reports
# (JUnit, NDJSON) go to target/schemathesis-run/. Exits non-zero on any
# failure. Deterministic: a fixed seed and one worker.
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
spec="${OFREP_OPENAPI:-$repo/../shared/reference/ofrep/openapi.yaml}"
flaghost="${FLAGHOST_BIN:-$repo/target/debug/flaghost}"
venv="$repo/target/schemathesis-venv"
work="$repo/target/schemathesis-run"
# Fuzzing cases per operation in the stale pass (the main pass takes
# max-examples from schemathesis.toml).
stale_examples="${SCHEMATHESIS_STALE_EXAMPLES:-200}"
# Hard bounds (seconds) on each pass, far above their usual length.
main_timeout="${SCHEMATHESIS_TIMEOUT:-240}"
stale_timeout="${SCHEMATHESIS_STALE_TIMEOUT:-90}"

start=$SECONDS
say() { printf '==> schemathesis: %s (%ss)\n' "$*" "$((SECONDS - start))"; }
die() { printf 'schemathesis run: %s\n' "$*" >&2; exit 1; }

[ -f "$spec" ] || die "OFREP OpenAPI file not found at $spec (set OFREP_OPENAPI)"
[ -x "$flaghost" ] || die "no flaghost binary at $flaghost: run 'cargo build -p flaghost' first (or set FLAGHOST_BIN)"
command -v curl >/dev/null || die "curl is needed"

# --- schemathesis, pinned, in a venv under target/ -------------------------
if [ "$("$venv/bin/schemathesis" --version 2>/dev/null || true)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
  say "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --timeout 60 \
    "schemathesis==$SCHEMATHESIS_VERSION"
fi
st="$venv/bin/schemathesis"
"$st" --version

# --- flaghost on a free loopback port --------------------------------------
rm -rf "$work"
mkdir -p "$work/flags" "$work/report"
cp "$here/flags/production.json" "$work/flags/production.json"
cp "$here/flags/production.json" "$work/flags/stale.json"

free_port() {
  "$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pid=""
stop_flaghost() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  pid=""
}
trap stop_flaghost EXIT
trap 'exit 130' INT TERM

# Only the options given here: no FLAGHOST_*, REDIS_URL or admin token from
# the caller's environment. A 1 s TTL lets the stale environment turn STALE
# quickly; the default environment refreshes from its (valid) file.
base=""
for attempt in 1 2 3; do
  port="$(free_port)"
  env -i PATH="$PATH" HOME="${HOME:-/tmp}" RUST_LOG="${RUST_LOG:-info}" \
    "$flaghost" serve \
      --listen "127.0.0.1:$port" \
      --flags "$work/flags" \
      --default-environment production \
      --cache-ttl 1 \
      --watch-interval-ms 200 \
      --check-interval-ms 200 \
      >"$work/flaghost.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do
    if curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
      base="http://127.0.0.1:$port"
      break 2
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  stop_flaghost
  say "flaghost did not come up on port $port (attempt $attempt)"
  sed 's/^/    /' "$work/flaghost.log" >&2
done
[ -n "$base" ] || die "flaghost did not start; log: $work/flaghost.log"
say "flaghost ready at $base"

evaluate() { # environment-prefix flag-key
  curl -sS -X POST "$base$1/ofrep/v1/evaluate/flags/$2" \
    -H 'content-type: application/json' -d '{"context": {"targetingKey": "probe"}}'
}

# Load `stale`, then break its file: once its snapshot is past the TTL and
# cannot be refreshed, flaghost serves it with reason STALE.
evaluate /environments/stale theme-color | grep -q '"reason":"STATIC"' \
  || die "environment stale did not load; log: $work/flaghost.log"
printf '{ "flags": ' >"$work/flags/stale.json"
stale=""
for _ in $(seq 1 75); do
  if evaluate /environments/stale theme-color | grep -q '"reason":"STALE"'; then
    stale=yes
    break
  fi
  sleep 0.2
done
[ -n "$stale" ] || die "environment stale never answered STALE; log: $work/flaghost.log"
say "environment stale answers STALE"

# --- the two passes ---------------------------------------------------------
export SCHEMATHESIS_HOOKS="$here/hooks.py"
cd "$work" # schemathesis and Hypothesis write nothing into the source tree

run_pass() { # name timeout url [extra schemathesis options...]
  local name="$1" limit="$2" url="$3"
  shift 3
  say "pass $name: $url"
  local status=0
  timeout --kill-after=10 "$limit" "$st" --config-file "$here/schemathesis.toml" run "$spec" \
    --url "$url" --no-color \
    --report junit,ndjson \
    --report-junit-path "$work/report/$name.junit.xml" \
    --report-ndjson-path "$work/report/$name.ndjson" \
    "$@" 2>&1 | tee "$work/$name.out" || status=$?
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    say "pass $name: stopped after ${limit}s"
  fi
  local cases
  cases="$(sed -n 's/^ *\([0-9][0-9]*\) generated.*/\1/p' "$work/$name.out" | tail -1)"
  printf -v "${name}_cases" '%s' "${cases:-0}"
  printf -v "${name}_status" '%s' "$status"
}

main_cases=0 main_status=0 stale_cases=0 stale_status=0
run_pass main "$main_timeout" "$base"
run_pass stale "$stale_timeout" "$base/environments/stale" --max-examples "$stale_examples"

if ! kill -0 "$pid" 2>/dev/null; then
  say "flaghost exited during the run; log: $work/flaghost.log"
  main_status=1
fi
if grep -q ' ERROR ' "$work/flaghost.log"; then
  say "flaghost logged errors:"
  grep ' ERROR ' "$work/flaghost.log" | head -20
fi

say "done: main pass $main_cases cases (exit $main_status), stale pass $stale_cases cases (exit $stale_status); reports in $work/report"
failed=0
[ "$main_status" = 0 ] || failed=$((failed + 1))
[ "$stale_status" = 0 ] || failed=$((failed + 1))
echo "schemathesis: $((2 - failed)) passed, $failed failed"
[ "$failed" = 0 ]
