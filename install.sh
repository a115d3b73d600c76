#!/usr/bin/env bash
# Installs everything dicom-ai needs on a fresh Debian machine: DICOM peers and validators
# (apt) and a virtual environment at .venv with the package and its dev tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")"

apt_packages=(dcmtk dicom3tools orthanc orthanc-dicomweb orthanc-python libpixelmed-java pixelmed-apps
  insighttoolkit5-examples)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian starts Orthanc as a service on 4242/8042; tests and benchmarks run their own.
  if command -v systemctl >/dev/null 2>&1; then $sudo_cmd systemctl disable --now orthanc >/dev/null 2>&1 || true; fi
fi

stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  export PIP_CONSTRAINT="$PWD/constraints.txt"
  # torch first, from the pinned CPU build, so nothing pulls a CUDA torch.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
