#!/usr/bin/env bash
# Rebuild the bundled model from scratch with the repo's own commands, and measure it.
# Needs the train extra (pip install torch==2.13.0 && pip install -e '.[train]').
# Usage: bash scripts/release_model.sh [MINUTES]   (training wall-time budget, default 75)
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-75}
mkdir -p runs/final
[ -f data/dataset/manifest.json ] || divergent data build --out data/dataset
[ -f data/dataset/copy_index.npz ] || divergent data index --out data/dataset
divergent train --data data/dataset --out runs/main --max-minutes "$MINUTES" \
  --max-steps 100000 --threads 2 --resume
divergent export runs/main/model.pt --out model/bundled --data data/dataset \
  | tee runs/final/export.json
cp runs/main/model.pt model/bundled/model.pt   # weights only, no optimizer state
divergent evaluate nll --json | tee runs/final/nll.json
divergent bench model --json | tee runs/final/bench.json
divergent evaluate latent --json | tee runs/final/latent.json
divergent evaluate divergence --json --report docs/divergence_report \
  | tee runs/final/divergence.json
