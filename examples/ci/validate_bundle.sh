#!/usr/bin/env bash
# CI gate for a shipped bundle: verify its files, measure its latency on THIS machine (the device
# it ships to) and compare with the prediction its manifest recorded at export.
#
#   bash examples/ci/validate_bundle.sh bundles/int4            # default tolerance 10%
#   TOLERANCE=5% bash examples/ci/validate_bundle.sh bundles/int4
#
# Exit codes (llmshrink's): 0 within tolerance, 4 outside it, 2 bad input (e.g. a file whose hash
# changed), 5 hardware missing (a TensorRT engine on a machine without its GPU).
# The JSON verdict is kept in $REPORT for the CI system to archive.
set -euo pipefail
BUNDLE=${1:?usage: validate_bundle.sh BUNDLE_DIR}
REPORT=${REPORT:-latency-validation.json}

status=0
llmshrink validate "$BUNDLE" --tolerance "${TOLERANCE:-10%}" --json > "$REPORT" || status=$?
if [[ ! -s "$REPORT" ]]; then  # no verdict (bad input, missing hardware): llmshrink said why on stderr
  exit "$status"
fi
python3 - "$REPORT" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
m = v["measured"]
print(f"predicted {v['predicted_ms']:.2f} ms, measured {m['floor_ms']:.2f} ms (floor; median {m['median_ms']:.2f}) "
      f"on {m['host']}: {v['error_pct']:+.1f}% vs ±{v['tolerance_pct']:g}% -> {'PASS' if v['passed'] else 'FAIL'}")
PY
exit "$status"
