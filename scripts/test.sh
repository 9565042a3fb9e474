#!/usr/bin/env bash
# Install test dependencies and run the tests (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Real peers for the live tests (JACK dummy server, MIDI clock, liblo, mosquitto, Pd, Link's
# libatomic): installed as root when missing, so CI on a fresh machine has them.
# chromium + chromium-driver: the browser view's test (tests/server/test_web.py)
PEERS="jackd2 jack-midi-clock liblo-tools mosquitto mosquitto-clients puredata-core libasound2 libatomic1 openssl chromium chromium-driver"
if ! command -v jackd >/dev/null || ! command -v jack_midi_clock >/dev/null || ! command -v oscsend >/dev/null \
   || ! command -v mosquitto >/dev/null || ! command -v mosquitto_pub >/dev/null || ! command -v pd >/dev/null \
   || ! command -v openssl >/dev/null || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null \
   || ! (ldconfig -p | grep -c "libatomic.so.1" >/dev/null); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PEERS >/dev/null
  else
    echo "scripts/test.sh: missing real peers; as root: apt-get install $PEERS" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch==2.13.0 first: on these machines it is a CPU build on disk; any other spec
# downloads GBs of CUDA packages.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[train,test]"
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
