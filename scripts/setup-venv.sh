#!/usr/bin/env bash
# Create .venv in the repository root.
#
# The third-party packages (torch alone is several GB) live in a shared environment under
# ${STREAMER_CACHE:-$HOME/.cache/streamer}/deps-<hash of requirements.txt and the Python version>,
# built once and reused by every checkout while requirements.txt is unchanged. .venv itself is a small
# virtual environment that reaches those packages through a .pth file and holds the project as an
# editable install, so each checkout imports its own source.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
cache=${STREAMER_CACHE:-$HOME/.cache/streamer}
key=$( { cat requirements.txt; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
deps="$cache/deps-$key"

if [ ! -f "$deps/.complete" ]; then
  echo "setup-venv: installing requirements into $deps (first run on this machine takes several minutes)"
  rm -rf "$deps"
  mkdir -p "$cache"
  "$python" -m venv "$deps"
  "$deps/bin/python" -m pip install --quiet --upgrade pip
  "$deps/bin/python" -m pip install --quiet -r requirements.txt
  touch "$deps/.complete"
fi

if [ ! -f .venv/.deps ] || [ "$(cat .venv/.deps)" != "$deps" ]; then
  rm -rf .venv
  "$python" -m venv --without-pip .venv
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  deps_site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  echo "$deps_site" > "$site/streamer-deps.pth"
  echo "$deps" > .venv/.deps
fi
# setuptools warns on every editable install that a folder named like the package could shadow it, which
# reads as an error to a newcomer. Here that folder is the package itself.
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation \
  --disable-pip-version-check -e .
.venv/bin/python -c 'import torch, aiokafka, prometheus_client, orjson, streamer' \
  || { echo "setup-venv: .venv cannot import its packages; remove $deps and run again" >&2; exit 1; }
