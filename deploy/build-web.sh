#!/usr/bin/env bash
# Builds the web client: mp-client for wasm32-unknown-unknown, then wasm-bindgen --target web,
# then gzip twins of the large files. Idempotent and quick when nothing changed.
#   output: $MP_WEB_DIR (default $MP_CACHE_DIR/web): index.html, start.js, mp_client.js,
#           mp_client_bg.wasm (+ .gz), served by the gateway from / (web_dir / MP_WEB_DIR).
# Installs what is missing: the rustup target, and wasm-bindgen-cli built from crates.io at
# exactly the wasm-bindgen version in Cargo.lock (the CLI and the library must match).
# MP_WASM_OPT=1 also runs binaryen's wasm-opt -Oz (from npm; about 6 minutes on 2 cores, the
# .wasm 17 % and its gzip 9 % smaller): the Docker image does, day-to-day builds do not.
# The bundle is rebuilt only when the compiled module or the page changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export MP_CACHE_DIR=${MP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/machine-punishment}
target_dir=${CARGO_TARGET_DIR:-$MP_CACHE_DIR/target}
out=${MP_WEB_DIR:-$MP_CACHE_DIR/web}
log() { printf '[build-web] %s\n' "$*" >&2; }

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  log "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown >&2
fi

want=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$root/Cargo.lock")
[ -n "$want" ] || { log "no wasm-bindgen in Cargo.lock"; exit 1; }
tools="$MP_CACHE_DIR/tools"
bindgen="$tools/bin/wasm-bindgen"
if [ "$("$bindgen" --version 2>/dev/null | awk '{print $2}')" != "$want" ]; then
  log "installing wasm-bindgen-cli $want (built from source, a few minutes the first time)"
  # --locked first; if a crate its lock file names is not in the registry, resolve afresh
  # (the version of wasm-bindgen-cli itself stays exact).
  cargo install --locked --quiet --root "$tools" wasm-bindgen-cli --version "$want" >&2 ||
    cargo install --quiet --root "$tools" wasm-bindgen-cli --version "$want" >&2
fi

log "building mp-client for wasm32 (profile wasm-release)"
(cd "$root" && CARGO_TARGET_DIR="$target_dir" cargo rustc --quiet -p mp-client --lib \
  --target wasm32-unknown-unknown --profile wasm-release --crate-type cdylib >&2)

wasm="$target_dir/wasm32-unknown-unknown/wasm-release/mp_client.wasm"
page="$root/clients/mp-client/web"
stamp=$(cat "$wasm" "$page/index.html" "$page/start.js" | sha256sum | cut -c1-64)-opt${MP_WASM_OPT:-0}
if [ -f "$out/mp_client_bg.wasm" ] && [ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ]; then
  log "web client in $out is up to date"
  exit 0
fi

mkdir -p "$out"
tmp=$(mktemp -d "$out.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$bindgen" --target web --no-typescript --out-dir "$tmp" "$wasm"
# wasm-opt (binaryen, from the npm registry; runs on node) shrinks the module further. Without
# npm the bundle is still complete, only larger.
binaryen=132.0.0
opt="$tools/binaryen/node_modules/.bin/wasm-opt"
if [ "${MP_WASM_OPT:-0}" = 1 ] && [ ! -x "$opt" ] && command -v npm >/dev/null 2>&1; then
  log "installing binaryen $binaryen (wasm-opt) from npm"
  npm install --silent --no-audit --no-fund --prefix "$tools/binaryen" "binaryen@$binaryen" >&2 ||
    log "binaryen did not install: the module is not run through wasm-opt"
fi
if [ "${MP_WASM_OPT:-0}" = 1 ] && [ -x "$opt" ]; then
  # The features rustc's wasm32 target emits by default.
  "$opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    --enable-mutable-globals --enable-reference-types --enable-multivalue \
    "$tmp/mp_client_bg.wasm" -o "$tmp/mp_client_bg.opt.wasm"
  mv -f "$tmp/mp_client_bg.opt.wasm" "$tmp/mp_client_bg.wasm"
fi
cp "$page/index.html" "$page/start.js" "$tmp/"
for f in mp_client_bg.wasm mp_client.js; do gzip -9 -n -k -f "$tmp/$f"; done
# Replace the bundle file by file (a running gateway reads them per request).
for f in "$tmp"/*; do mv -f "$f" "$out/"; done
echo "$stamp" > "$out/.stamp"
wasm=$(stat -c %s "$out/mp_client_bg.wasm")
gz=$(stat -c %s "$out/mp_client_bg.wasm.gz")
log "web client in $out: mp_client_bg.wasm $((wasm / 1024)) KiB, gzip $((gz / 1024)) KiB"
