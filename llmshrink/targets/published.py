"""Published measurements against the predictor: each ``checks`` entry of a target's YAML, predicted.

A target's YAML may cite measured figures (a model shape, a uniform format,
a workload, the number and where it was published). This module predicts
each one with the target's table — for GPU targets, the analytical roofline
of :mod:`llmshrink.targets.analytical` — so a profile's assumptions are
checked against the world. It sits above :mod:`llmshrink.targets.predict`;
the roofline sits below it.
"""

from __future__ import annotations

from dataclasses import replace

from llmshrink.spec import BaseShape, SubnetSpec
from llmshrink.targets.predict import predict
from llmshrink.targets.profile import TargetProfile
from llmshrink.targets.workload import parse_workload


def check_published(target: TargetProfile) -> list[dict]:
    """Predict each published measurement in ``target.checks``; rows with predicted, measured and error.

    Each check names a model shape, a uniform format, a workload and the
    published figure; the prediction is for the unpruned model in that format
    (lm_head and embedding in fp16, as the runtimes keep them).
    """
    rows = []
    for c in target.checks:
        s = c["shape"]
        base = BaseShape(num_layers=s["layers"], hidden_size=s["hidden"], num_heads=s["heads"],
                         num_kv_heads=s["kv_heads"], head_dim=s["head_dim"], intermediate_size=s["mlp"],
                         vocab_size=s["vocab"], tied_embeddings=False)
        spec = replace(SubnetSpec.uniform(base, c["format"], lm_head="fp16", model=c["model"]), embedding="fp16")
        w = parse_workload(c["workload"])
        p = predict(spec, target, w)
        rows.append({"model": c["model"], "runtime": c["runtime"], "format": c["format"], "workload": str(w),
                     "metric": c.get("metric", ""), "measured_ms": float(c["measured_ms"]),
                     "predicted_ms": p.total_ms, "error_pct": (p.total_ms - c["measured_ms"]) / c["measured_ms"] * 100,
                     "source": c["source"]})
    return rows
