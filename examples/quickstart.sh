#!/usr/bin/env bash
# Quick start: compress the built-in SmolLM2-135M for this CPU under a decode-latency budget,
# then read the report, re-check the bundle's latency and ask it a question.
#
#   bash examples/quickstart.sh                 # defaults below (about 45 minutes on 2 cores)
#   LATENCY=6ms OUT=runs/q6 bash examples/quickstart.sh
#
# Every variable can be overridden from the environment; EXTRA holds further `compress` flags
# (e.g. EXTRA="--steps 40 --recovery-steps 40" for a quicker, rougher run).
set -euo pipefail

MODEL=${MODEL:-smollm2-135m}     # a built-in name, a local HF directory, a .gguf file or a hub id
TARGET=${TARGET:-cpu}            # `llmshrink targets list`; a YAML file defines your own
LATENCY=${LATENCY:-1.15xint4-a8} # 1.15x the uniform int4 export's predicted latency (cpu: decode, 256 tokens in cache)
OUT=${OUT:-runs/quickstart}
PROMPT=${PROMPT:-What is the capital of France?}

# shellcheck disable=SC2086  # EXTRA is a list of flags
llmshrink compress --model "$MODEL" --target "$TARGET" --latency "$LATENCY" --out "$OUT" ${EXTRA:-}

llmshrink report "$OUT"                       # report.md and pareto.png in the run directory
# the shipped bundle (role "selected" in run.json; the other candidates/ are the contenders it beat)
bundle="$OUT/$(python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); r = r.get("_data", r)
print(next(e.get("_data", e)["path"] for e in r["entries"] if e.get("_data", e)["role"] == "selected"))' "$OUT/run.json")"
llmshrink validate "$bundle" ${TOLERANCE:+--tolerance "$TOLERANCE"}   # exit 4 if the latency misses its prediction
llmshrink run "$bundle" --prompt "$PROMPT" --max-new-tokens "${MAX_NEW_TOKENS:-24}"
