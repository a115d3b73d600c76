#!/usr/bin/env bash
# Installs everything dicom-ai needs on a fresh Debian machine: DICOM peers and validators
# (apt) and a virtual environment at .venv with the package and its dev tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")"

apt_packages=(dcmtk dicom3tools orthanc orthanc-dicomweb orthanc-python libpixelmed-java pixelmed-apps
  tesseract-ocr fonts-dejavu-core
  insighttoolkit5-examples chromium chromium-driver)
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
  .venv/bin/python -m pip install -q -e '.[dev,ray]'
  touch "$stamp"
fi

# Wheels of the versions MONAI model-zoo bundles declare, for `dicom-ai models prepare` (a
# bundle's own environment is built from them first, without the network; tests use them).
wheels=(monai==1.4.0 monai==1.3.0 numpy==1.25.2 numpy==1.24.4 einops==0.7.0 pytorch-ignite==0.4.11)
wheel_stamp=.venv/wheelhouse/.downloaded
if [ ! -f "$wheel_stamp" ] || [ "$(cat "$wheel_stamp")" != "${wheels[*]}" ]; then
  mkdir -p .venv/wheelhouse
  # One at a time: pip download resolves its arguments together, and two monai conflict.
  for w in "${wheels[@]}"; do
    PIP_CONSTRAINT= .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .venv/wheelhouse "$w"
  done
  echo "${wheels[*]}" > "$wheel_stamp"
fi

# OHIF Viewer for tests/viewers: the prebuilt app of @ohif/app (its own `npm install` needs
# packages the registry lacks; the packed tarball's dist/ needs none of them), and
# puppeteer-core from tests/viewers/package-lock.json to drive Debian's chromium with it
# (puppeteer-core downloads no browser).
ohif_version=3.13.2
ohif_stamp=.venv/ohif/.installed
viewers_stamp=tests/viewers/node_modules/.installed
if ! command -v npm >/dev/null 2>&1; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends nodejs npm
fi
if [ ! -f "$ohif_stamp" ] || [ "$(cat "$ohif_stamp")" != "$ohif_version" ]; then
  ohif_tmp=$(mktemp -d)
  ohif_tgz=$(cd "$ohif_tmp" && npm pack --silent "@ohif/app@$ohif_version" | tail -n 1)
  rm -rf .venv/ohif && mkdir -p .venv/ohif
  tar -xzf "$ohif_tmp/$ohif_tgz" -C .venv/ohif --strip-components=1 package/dist
  rm -rf "$ohif_tmp"
  echo "$ohif_version" > "$ohif_stamp"
fi
if [ ! -f "$viewers_stamp" ] || [ tests/viewers/package-lock.json -nt "$viewers_stamp" ]; then
  (cd tests/viewers && npm ci --silent --no-audit --no-fund --ignore-scripts)
  touch "$viewers_stamp"
fi
