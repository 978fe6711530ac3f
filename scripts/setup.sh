#!/usr/bin/env bash
# Installs what a fresh machine lacks: the Fashion-MNIST Debian package (plus, with --test, the
# browser, the databases and the single-host Slurm cluster the tests use) and this project with its
# Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
PKGS="dataset-fashion-mnist"
EXTRAS="[energy]"
if [ "${1:-}" = "--test" ]; then
  PKGS="$PKGS chromium postgresql slurm-wlm slurmdbd munge mariadb-server"
  EXTRAS="[dev,avalanche,energy]"
fi
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".${EXTRAS}"
