#!/usr/bin/env bash
# Builds the web client: mp-client for wasm32-unknown-unknown, then wasm-bindgen --target web,
# then gzip twins of the large files. Idempotent and quick when nothing changed.
#   output: $MP_WEB_DIR (default $MP_CACHE_DIR/web): index.html, start.js, mp_client.js,
#           mp_client_bg.wasm (+ .gz), served by the gateway from / (web_dir / MP_WEB_DIR).
# Installs what is missing: the rustup target, and wasm-bindgen-cli built from crates.io at
# exactly the wasm-bindgen version in Cargo.lock (the CLI and the library must match).
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

mkdir -p "$out"
tmp=$(mktemp -d "$out.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$bindgen" --target web --no-typescript --out-dir "$tmp" \
  "$target_dir/wasm32-unknown-unknown/wasm-release/mp_client.wasm"
# wasm-opt (binaryen, from the npm registry; runs on node) shrinks the module further. Without
# npm the bundle is still complete, only larger.
binaryen=132.0.0
opt="$tools/binaryen/node_modules/.bin/wasm-opt"
if [ ! -x "$opt" ] && command -v npm >/dev/null 2>&1; then
  log "installing binaryen $binaryen (wasm-opt) from npm"
  npm install --silent --no-audit --no-fund --prefix "$tools/binaryen" "binaryen@$binaryen" >&2 ||
    log "binaryen did not install: the module is not run through wasm-opt"
fi
if [ -x "$opt" ]; then
  # The features rustc's wasm32 target emits by default.
  "$opt" -Oz --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    --enable-mutable-globals --enable-reference-types --enable-multivalue \
    "$tmp/mp_client_bg.wasm" -o "$tmp/mp_client_bg.opt.wasm"
  mv -f "$tmp/mp_client_bg.opt.wasm" "$tmp/mp_client_bg.wasm"
fi
cp "$root/clients/mp-client/web/index.html" "$root/clients/mp-client/web/start.js" "$tmp/"
for f in mp_client_bg.wasm mp_client.js; do gzip -9 -n -k -f "$tmp/$f"; done
# Replace the bundle file by file (a running gateway reads them per request).
for f in "$tmp"/*; do mv -f "$f" "$out/"; done
wasm=$(stat -c %s "$out/mp_client_bg.wasm")
gz=$(stat -c %s "$out/mp_client_bg.wasm.gz")
log "web client in $out: mp_client_bg.wasm $((wasm / 1024)) KiB, gzip $((gz / 1024)) KiB"
