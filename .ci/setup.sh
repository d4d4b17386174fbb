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
# festival and four festvox voices for tests/test_manyvoices.py (about 20 MB, a few seconds)
if ! command -v text2wave >/dev/null 2>&1 || [ ! -d /usr/share/festival/voices/czech/czech_ph ] \
    || [ ! -d /usr/share/festival/voices/english/ked_diphone ] || [ ! -d /usr/share/festival/voices/english/kal_diphone ] \
    || [ ! -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ]; then
  echo "[setup] installing festival and festvox voices (apt-get)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq festival festvox-kallpc16k festvox-kdlpc16k \
    festvox-us-slt-hts festvox-czech-ph >/dev/null
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
