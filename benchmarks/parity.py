"""Export parity on the real model: ONNX Runtime vs the torch CompressedModel.

For the original spec (in fp32 and in the two shipped int8-activation formats,
w4g32a8 and w8a8) and N seeded random specs of SmolLM2-135M, run 512 tokens of
held-out WikiText-2 text: a prefill of the first 384 tokens, then 128 one-token
decode steps with the KV cache, in both runtimes, and compare logits.

Each random seed gives three specs: fp32, integer weights with float
activations (fp32/w4g32/w8g32/w4g64z/w2g32), and the same plus int8-activation
formats (w4g32a8, w2g32a8, w8a8).

Float specs are also run in float64 (the same CompressedModel, ``.double()``)
as the exact reference, and the torch fp32 model is run again with its
embedding table moved by one float32 rounding (x (1 + 2^-23 N(0,1)), 3 draws):
on pruned SmolLM2 specs whose residual stream grows to |x| ~ 75 at the steps
where a massive activation forms, a one-ulp change of the input moves torch's
own logits by more than 1e-3, so no second fp32 implementation can meet 1e-3
there. The table shows, per float spec, that one-ulp spread and the median over
positions of each runtime's distance from float64 (the bulk, not the tail).

Every spec also reports perplexity on the 512 tokens in both runtimes: what a
user sees of the model, whatever its top-1 agreement.

Rules: float formats max |d| <= 1e-3 (the issue's rule, reported as is; the
"fp32 noise" column says whether a miss is below torch's own one-ulp spread with
ORT's median error vs float64 within 1.5x of torch's); integer weights top-1 >=
99%. With int8 activations rounding is discontinuous, so the table also shows
the torch model's agreement with itself after a 1e-6 relative perturbation of
its embeddings (3 draws; median, with the range); such a spec passes when ORT
agrees with torch within 2 points of that median, or >= 99%.

    python benchmarks/parity.py --data-dir ../shared/evaldata [--specs 10]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from llmshrink.evaluation.scoring import log_softmax
from llmshrink.exporters.parity import top1_in_top5

WEIGHT_ONLY = ("fp32", "w4g32", "w8g32", "w4g64z", "w2g32")
WITH_INT8_ACTS = ("fp32", "w4g32", "w8g32", "w4g64z", "w4g32a8", "w8a8", "w2g32a8")


def run_ort(decoder, ids: np.ndarray, split: int) -> np.ndarray:
    kv = decoder.kv_session(ids.shape[1])
    out = [kv.step(ids[:, :split])]
    out += [kv.step(ids[:, t:t + 1]) for t in range(split, ids.shape[1])]
    return np.concatenate(out, 1)[0]


@torch.no_grad()
def run_torch(cm, ids: np.ndarray, split: int) -> np.ndarray:
    t = torch.from_numpy(ids)
    logits, past = cm(t[:, :split])
    out = [logits]
    for i in range(split, ids.shape[1]):
        logits, past = cm(t[:, i:i + 1], past)
        out.append(logits)
    return torch.cat(out, 1)[0].numpy()


def perturbed(cm, relative: float, draws: int):
    """Yield ``cm`` with its embedding table scaled by (1 + relative * N(0,1)), one seeded draw at a time."""
    saved = cm.embed.clone()
    try:
        for k in range(draws):
            g = torch.Generator().manual_seed(k)
            cm.embed.copy_(saved * (1 + relative * torch.randn(saved.shape, generator=g)))
            yield cm
    finally:
        cm.embed.copy_(saved)


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean NLL) of tokens 1.. given the logits at 0.. (float64 log-softmax)."""
    logp = log_softmax(logits[:-1])
    return float(np.exp(-np.mean(logp[np.arange(len(logp)), ids[0, 1:len(logp) + 1]])))


@dataclasses.dataclass
class Row:
    """One spec's measurements (float64 distances are per position: max over the vocabulary)."""

    name: str
    layers: int
    hidden: int
    formats: str
    d_prefill: float
    d_decode: float
    top1: float
    in_top5: float
    ppl_ort: float
    ppl_torch: float
    rule: str = ""
    ok: bool = False
    ort_f64: np.ndarray | None = None
    torch_f64: np.ndarray | None = None
    ulp_spread: float | None = None
    floors: list[float] = dataclasses.field(default_factory=list)
    floor_ppls: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def within_fp32_noise(self) -> bool | None:
        """For a float spec that misses 1e-3: is 1e-3 below torch's own one-ulp spread, with ORT's median error
        vs float64 within 1.5x torch's? (None for other specs.)"""
        if self.ort_f64 is None or self.ok:
            return None
        return self.ulp_spread > 1e-3 and np.median(self.ort_f64) <= 1.5 * np.median(self.torch_f64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True, help="the shared evaldata folder (WikiText-2 test)")
    ap.add_argument("--specs", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    args = ap.parse_args()

    from llmshrink.compressor.materialize import materialize
    from llmshrink.exporters.onnx_ort import build_ort_graph
    from llmshrink.exporters.ort_session import OrtDecoder
    from llmshrink.formats import parse_format
    from llmshrink.models import load_model, load_tokenizer
    from llmshrink.spec import BaseShape, SubnetSpec, random_spec

    hf, tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    base = BaseShape.from_config(hf.config)
    text = (args.data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = np.array([tok(text[:100_000])["input_ids"][:args.tokens]], np.int64)
    split = args.tokens - args.decode
    # The original model also in the two shipped int8-activation formats (what `compress`
    # and the genai-equivalent int4 bundle deploy), beside the random mixed specs.
    specs = [("original", SubnetSpec.original(base)), ("original w4g32a8", SubnetSpec.uniform(base, "w4g32a8")),
             ("original w8a8", SubnetSpec.uniform(base, "w8a8"))]
    for s in range(args.specs):
        specs.append((f"random {s} fp32", random_spec(base, s, formats=("fp32",))))
        specs.append((f"random {s} int weights", random_spec(base, s, formats=WEIGHT_ONLY)))
        specs.append((f"random {s} int8 acts", random_spec(base, s, formats=WITH_INT8_ACTS)))
    rows = []
    for name, spec in specs:
        t0 = time.time()
        cm = materialize(hf, spec, tok)
        dec = OrtDecoder(build_ort_graph(cm, max_length=args.tokens + 1).SerializeToString(), threads=2)
        a, b = run_ort(dec, ids, split), run_torch(cm, ids, split)
        fmts = [parse_format(f) for f in spec.formats_used()]
        row = Row(name, len(spec.kept_layers()), spec.hidden_size, ",".join(sorted(spec.formats_used())),
                  float(np.abs(a[:split] - b[:split]).max()), float(np.abs(a[split:] - b[split:]).max()),
                  float((a.argmax(-1) == b.argmax(-1)).mean()), top1_in_top5(a, b), perplexity(a, ids),
                  perplexity(b, ids))
        if all(f.is_float for f in fmts):
            row.rule, row.ok = "max|d|<=1e-3", max(row.d_prefill, row.d_decode) <= 1e-3
            c = run_torch(copy.deepcopy(cm).double(), ids, split)
            row.ort_f64, row.torch_f64 = np.abs(a - c).max(-1), np.abs(b - c).max(-1)
            row.ulp_spread = max(float(np.abs(run_torch(p, ids, split) - b).max())
                                 for p in perturbed(cm, 2.0 ** -23, draws=3))
        elif all(f.act == "none" for f in fmts):
            row.rule, row.ok = "top1>=99%", row.top1 >= 0.99
        else:
            for p in perturbed(cm, 1e-6, draws=3):
                c = run_torch(p, ids, split)
                row.floors.append(float((c.argmax(-1) == b.argmax(-1)).mean()))
                row.floor_ppls.append(perplexity(c, ids))
            row.rule = "top1>=min(99%, floor-2pt)"
            row.ok = row.top1 >= min(0.99, float(np.median(row.floors)) - 0.02)
        row.seconds = time.time() - t0
        rows.append(row)
        print(f"{name}: done in {row.seconds:.0f} s", flush=True)
    print(f"\n# Parity ORT vs torch — SmolLM2-135M, {args.tokens} WikiText-2 test tokens: prefill {split}, "
          f"then {args.decode} decode steps with KV cache")
    print(f"# command: python benchmarks/parity.py --data-dir {args.data_dir} --specs {args.specs} --tokens {args.tokens} "
          f"--decode {args.decode}\n")
    print("| spec | layers | hidden | formats | max|d| prefill | max|d| decode | top-1 | in torch top-5 | ppl ORT / torch "
          "| int8 noise floor (range) | torch ppl, perturbed | 1-ulp spread | median err vs f64 ORT / torch | fp32 noise | rule | pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        floor = (f"{np.median(r.floors):.1%} ({min(r.floors):.1%}–{max(r.floors):.1%})" if r.floors else "-")
        ulp = f"{r.ulp_spread:.2e}" if r.ulp_spread is not None else "-"
        fppl = f"{min(r.floor_ppls):.2f}–{max(r.floor_ppls):.2f}" if r.floor_ppls else "-"
        med = (f"{np.median(r.ort_f64):.2e} / {np.median(r.torch_f64):.2e}" if r.ort_f64 is not None else "-")
        noise = {None: "-", True: "yes", False: "no"}[r.within_fp32_noise]
        print(f"| {r.name} | {r.layers} | {r.hidden} | {r.formats} | {r.d_prefill:.2e} | {r.d_decode:.2e} "
              f"| {r.top1:.1%} | {r.in_top5:.1%} | {r.ppl_ort:.2f} / {r.ppl_torch:.2f} | {floor} | {fppl} | {ulp} | {med} | {noise} "
              f"| {r.rule} | {'yes' if r.ok else 'NO'} |")
    print(f"\n{sum(r.ok for r in rows)}/{len(rows)} specs pass")
    fl = [r for r in rows if r.ort_f64 is not None]
    missed = [r for r in fl if not r.ok]
    print(f"float specs: {len(missed)}/{len(fl)} miss 1e-3; of those, {sum(bool(r.within_fp32_noise) for r in missed)} "
          f"are within fp32 noise (torch's own one-ulp spread > 1e-3, ORT's median error vs float64 <= 1.5x torch's); "
          f"torch fp32 itself misses float64 by more than 1e-3 in {sum(r.torch_f64.max() > 1e-3 for r in fl)}/{len(fl)}")
    exact = [r for r in rows if not r.floor_ppls]
    worst = max(abs(np.log(r.ppl_ort / r.ppl_torch)) for r in exact)
    print(f"perplexity ORT vs torch without int8 activations: largest relative difference {np.expm1(worst):.3%} "
          f"over {len(exact)} specs")
    a8 = [r for r in rows if r.floor_ppls]
    inside = [r for r in a8 if min(r.floor_ppls + [r.ppl_torch]) <= r.ppl_ort <= max(r.floor_ppls + [r.ppl_torch])]
    print(f"int8 activations: ORT perplexity inside the range of torch's own runs (unperturbed and 3 perturbed) in "
          f"{len(inside)}/{len(a8)} specs")

if __name__ == "__main__":
    main()
