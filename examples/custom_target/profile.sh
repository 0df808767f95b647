#!/usr/bin/env bash
# Measure edge-box.yaml's latency table on the machine this runs on (the appliance), check a
# prediction from it, then compress for it.
#
#   bash examples/custom_target/profile.sh          # about 15 minutes of profiling for SmolLM2-135M
#   MODELS=12 bash examples/custom_target/profile.sh   # fewer random subnets: quicker, looser fit
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-smollm2-135m}
MODELS=${MODELS:-52}               # random subnets to build and time
TARGET=${TARGET:-$here/edge-box.yaml}

# 1. the table: every format the target lists, on random subnets of the model family
llmshrink targets profile "$TARGET" --model "$MODEL" --models "$MODELS" --out "$here/edge-box-table.json"

# 2. what it predicts for the unpruned model in int4 weights / int8 activations, per op kind
llmshrink spec new --model "$MODEL" --uniform w4g32a8 --out "$here/int4.json"
llmshrink targets predict --target "$TARGET" --spec "$here/int4.json"

# 3. compress against it (budget: LATENCY, default 70% of that prediction)
if [[ -z "${LATENCY:-}" ]]; then
  LATENCY=$(llmshrink targets predict --target "$TARGET" --spec "$here/int4.json" --json |
            python3 -c 'import json, sys; print("%.3fms" % (0.7 * json.load(sys.stdin)["total_ms"]))')
fi
# shellcheck disable=SC2086
llmshrink compress --model "$MODEL" --target "$TARGET" --latency "$LATENCY" --out "${OUT:-runs/edge-box}" ${EXTRA:-}
