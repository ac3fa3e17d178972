#!/usr/bin/env bash
# Create the virtual environment that runs the peer implementations of benchmarks/compare.py.
#
# Quix Streams and faust-streaming pin their own Kafka clients and helpers, so they stay out of the
# project's environment. The peers environment is a plain venv under
# ${STREAMER_CACHE:-$HOME/.cache/streamer}/peers-venv with those two packages and their pinned
# dependencies installed. It reaches torch, numpy and orjson through a .pth file that names the project's
# shared dependency environment (the one .venv uses, see scripts/setup-venv.sh). The .pth entry is appended
# after the venv's own site-packages on sys.path, so every package installed here shadows the shared copy.
# The project itself is reached the same way, so the peers import streamer.model.SeedNet from this checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
cache=${STREAMER_CACHE:-$HOME/.cache/streamer}
peers="$cache/peers-venv"
requirements=benchmarks/peers/requirements.txt

if [ ! -f .venv/.deps ]; then
  echo "peers setup-venv: .venv is missing; run scripts/setup-venv.sh (or make venv) first" >&2
  exit 1
fi
deps=$(cat .venv/.deps)
key=$( { cat "$requirements"; echo "$deps"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)

if [ ! -f "$peers/.complete" ] || [ "$(cat "$peers/.complete")" != "$key" ]; then
  echo "peers setup-venv: installing $requirements into $peers"
  rm -rf "$peers"
  "$python" -m venv "$peers"
  "$peers/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  site=$("$peers/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  deps_site=$("$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  echo "$deps_site" > "$site/streamer-deps.pth"
  echo "$key" > "$peers/.complete"
fi
# The repository root goes on sys.path through PYTHONPATH at run time (benchmarks/compare.py sets it), so
# one peers venv serves every checkout.
PYTHONPATH=$PWD "$peers/bin/python" -c 'import torch, orjson, quixstreams, faust, aiokafka, streamer.model; print("peers venv:", "torch", torch.__version__, "quixstreams", quixstreams.__version__, "faust", faust.__version__, "aiokafka", aiokafka.__version__)' \
  || { echo "peers setup-venv: $peers cannot import its packages; remove it and run again" >&2; exit 1; }
echo "$peers"
