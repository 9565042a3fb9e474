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
# learned divergence: the domain critic, BAD fine-tuning of the decoder (the gradient
# paths compared side by side first: docs/divergence.md), then the diverged int8 decoder
divergent critic train --data data/dataset --out runs/critic --steps 500 --json \
  | tee runs/final/critic.json
cp runs/critic/critic.onnx runs/critic/critic.json runs/critic/critic.pt model/bundled/
for m in expected gumbel_st policy_gradient; do
  divergent bad train --method "$m" --out "runs/bad_$m" --max-minutes 10 --steps 2000 \
    --batch-size 16 --lr 1e-4 --threads 1 --json > "runs/final/bad_$m.json" &
done
wait
# the winner (expected features), afresh from the base weights, with a stronger KL bound
divergent bad train --method expected --out runs/bad_main --max-minutes 25 --steps 2000 \
  --batch-size 16 --lr 1e-4 --kl-weight 0.2 --threads 2 --json | tee runs/final/bad.json
divergent bad export runs/bad_main/model.pt --out model/bundled
python - <<'PY'
import torch
b = torch.load("runs/bad_main/model.pt", map_location="cpu", weights_only=False)
b["model"] = {k: v.half() if v.is_floating_point() else v for k, v in b["model"].items()}
torch.save(b, "model/bundled/bad.pt")  # float16: half the bytes, for further fine-tuning
PY
divergent evaluate nll --json | tee runs/final/nll.json
divergent bench model --json | tee runs/final/bench.json
divergent evaluate latent --json | tee runs/final/latent.json
divergent evaluate divergence --json --report docs/divergence_report \
  | tee runs/final/divergence.json
