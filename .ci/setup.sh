#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (Python 3.9+) for speechbrain-diffsep: system packages for
# the synthetic speech (flite, espeak-ng), PyTorch, and the package with its test/eval extras.
# Idempotent: fast when everything is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if ! command -v flite >/dev/null 2>&1 || ! command -v espeak-ng >/dev/null 2>&1; then
  echo "[setup] installing flite and espeak-ng (apt-get)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq flite espeak-ng >/dev/null
fi

PY=${PYTHON:-python3}
# torch 2.14.1 is the newest release this environment allows; torchaudio 2.11 loads beside it.
if ! $PY -c "import torch, torchaudio" >/dev/null 2>&1; then
  echo "[setup] installing torch and torchaudio"
  $PY -m pip install -q "torch==2.14.1" "torchaudio==2.11.0"
fi
echo "[setup] installing speechbrain-diffsep[test,eval]"
$PY -m pip install -q -e ".[test,eval]" 2>/dev/null || $PY -m pip install -q -e ".[test]"
echo "[setup] done"
