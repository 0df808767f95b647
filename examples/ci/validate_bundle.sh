#!/usr/bin/env bash
# CI gate for a shipped bundle: verify its files, measure its latency on THIS machine (the device
# it ships to) and compare with the prediction its manifest recorded at export.
#
#   bash examples/ci/validate_bundle.sh bundles/int4            # default tolerance 10%
#   TOLERANCE=5% bash examples/ci/validate_bundle.sh bundles/int4
#   REFERENCE=bundles/int4 bash examples/ci/validate_bundle.sh runs/x/candidates/5.3ms
#
# REFERENCE makes the check relative (for shared runners whose speed drifts): both bundles are
# timed in turn and the measured latency ratio must match the ratio the target's table predicts.
# TARGET (a name or a target YAML) predicts with that target's table instead of the manifest's
# prediction; a relative check of a bundle made for a YAML target needs it.
#
# Exit codes (llmshrink's): 0 within tolerance, 4 outside it, 2 bad input (e.g. a file whose hash
# changed), 5 hardware missing (a TensorRT engine on a machine without its GPU).
# The JSON verdict is kept in $REPORT for the CI system to archive.
set -euo pipefail
BUNDLE=${1:?usage: validate_bundle.sh BUNDLE_DIR}
REPORT=${REPORT:-latency-validation.json}

status=0
opts=()
if [[ -n "${REFERENCE:-}" ]]; then opts+=(--reference "$REFERENCE"); fi
if [[ -n "${TARGET:-}" ]]; then opts+=(--target "$TARGET"); fi
llmshrink validate "$BUNDLE" --tolerance "${TOLERANCE:-10%}" "${opts[@]}" --json > "$REPORT" || status=$?
if [[ ! -s "$REPORT" ]]; then  # no verdict (bad input, missing hardware): llmshrink said why on stderr
  exit "$status"
fi
python3 - "$REPORT" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
m = v["measured"]
verdict = f"{v['error_pct']:+.1f}% vs ±{v['tolerance_pct']:g}% -> {'PASS' if v['passed'] else 'FAIL'}"
if v.get("reference"):
    print(f"latency / {v['reference']}: predicted {v['predicted_ratio']:.3f}x, measured {v['measured_ratio']:.3f}x "
          f"({v['rounds']} rounds in turn; this bundle {m['floor_ms']:.2f} ms floor) on {m['host']}: {verdict}")
else:
    print(f"predicted {v['predicted_ms']:.2f} ms, measured {m['floor_ms']:.2f} ms (floor; median {m['median_ms']:.2f}) "
          f"on {m['host']}: {verdict}")
PY
exit "$status"
