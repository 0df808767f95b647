"""Deployed speed: llmshrink's ort bundle vs onnxruntime-genai's model builder, side by side.

Workload: SmolLM2-135M-Instruct, batch 1, a 133-token prompt, greedy decode of
64 tokens; time to first token (TTFT) and time per output token (TPOT),
medians over interleaved repetitions in alternating order (A B, B A, ...),
same thread count.
Each system runs as its users run it: llmshrink through OrtDecoder.generate,
onnxruntime-genai through og.Generator (shared KV buffer). Both graphs also run
through one minimal Python IOBinding loop (SameRunner): that comparison is the
exports alone, without Python-vs-C++ runner overhead (~0.1-0.2 ms per step).

Needs `pip install onnxruntime-genai onnx_ir` (the peer, not a dependency).

    python benchmarks/deployed_speed.py [--reps 20] [--threads 2] [--precisions fp32,int4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# llmshrink formats that mirror the genai builder's precision flags:
# int4 = 4-bit, block 32, accuracy level 4 (int8 activations), lm_head int4.
PRECISIONS = {"fp32": ("fp32", []), "int4": ("w4g32a8", ["int4_block_size=32", "int4_accuracy_level=4"])}
PROMPT_TOKENS, NEW_TOKENS = 133, 64
SAME_OURS, SAME_THEIRS = "llmshrink graph, one runner", "genai graph, one runner"


def build_llmshrink(precision: str, out: Path) -> Path:
    from llmshrink import api
    from llmshrink.models import load_config
    from llmshrink.spec import BaseShape, SubnetSpec

    base = BaseShape.from_config(load_config("smollm2-135m"))
    spec = SubnetSpec.uniform(base, PRECISIONS[precision][0])
    if precision == "int4":  # genai's int4 also quantizes the (tied) embedding table, sharing the lm_head's
        spec = dataclasses.replace(spec, embedding="w4g32")
    api.export("smollm2-135m", spec, out, max_length=512)
    return out


def build_genai(precision: str, out: Path, threads: int) -> Path:
    from llmshrink.models import local_dir

    extra = PRECISIONS[precision][1]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(local_dir("smollm2-135m")),
           "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai-cache")]
    if extra:
        cmd += ["--extra_options", *extra]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


class Llmshrink:
    def __init__(self, bundle: Path, threads: int) -> None:
        from llmshrink.api import open_bundle

        self.b = open_bundle(bundle, threads=threads)

    def run(self, prompt: np.ndarray) -> tuple[float, list[float]]:
        # OrtDecoder.generate is what `llmshrink run` and the API's generation use.
        t0 = time.perf_counter()
        tokens = self.b.decoder.generate(prompt, NEW_TOKENS, max_length=PROMPT_TOKENS + NEW_TOKENS)
        next(tokens)
        ttft = time.perf_counter() - t0
        steps = []
        t = time.perf_counter()
        for _ in tokens:
            steps.append(time.perf_counter() - t)
            t = time.perf_counter()
        return ttft, steps


class SameRunner:
    """One minimal IOBinding greedy loop for either graph: the graphs compared with the runners taken out.

    Shared KV buffers bound as past and present, the step's ids rewritten in
    place, numpy argmax: what both runtimes do per step, in the same Python.
    """

    def __init__(self, model: Path, threads: int, kv_shapes: list[tuple[int, int]]) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.s.get_inputs()}
        self.kv_shapes, self.ort = kv_shapes, ort

    def run(self, prompt: np.ndarray) -> tuple[float, list[float]]:
        ort, total = self.ort, PROMPT_TOKENS + NEW_TOKENS
        b = self.s.io_binding()
        bufs = []
        for j, (heads, dim) in enumerate(self.kv_shapes):
            for kv in ("key", "value"):
                bufs.append(ort.OrtValue.ortvalue_from_numpy(np.zeros((1, heads, total, dim), np.float32)))
                b.bind_ortvalue_input(f"past_key_values.{j}.{kv}", bufs[-1])
                b.bind_ortvalue_output(f"present.{j}.{kv}", bufs[-1])
        ones = np.ones((1, total), np.int64)
        if "logits_to_keep" in self.inputs:
            b.bind_cpu_input("logits_to_keep", np.ones(1, np.int64))
        t0 = time.perf_counter()
        b.bind_cpu_input("input_ids", prompt.reshape(1, -1))
        b.bind_cpu_input("attention_mask", ones[:, :PROMPT_TOKENS])
        b.bind_output("logits")
        self.s.run_with_iobinding(b)
        nxt = int(b.get_outputs()[0].numpy()[0, -1].argmax())
        ttft = time.perf_counter() - t0
        ids = np.zeros((1, 1), np.int64)
        logits = np.zeros((1, 1, self.s.get_outputs()[0].shape[-1]), np.float32)
        b.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids))
        b.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        steps = []
        for t in range(PROMPT_TOKENS, total - 1):
            t1 = time.perf_counter()
            ids[0, 0] = nxt
            b.bind_cpu_input("attention_mask", ones[:, :t + 1])
            self.s.run_with_iobinding(b)
            nxt = int(logits[0, -1].argmax())
            steps.append(time.perf_counter() - t1)
        return ttft, steps


class Genai:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(path))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)

    def run(self, prompt: np.ndarray) -> tuple[float, list[float]]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=PROMPT_TOKENS + NEW_TOKENS, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt.astype(np.int32).reshape(1, -1))
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        steps = []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
        return ttft, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,int4")
    ap.add_argument("--workdir", type=Path, default=None, help="keep built models here (default: a temp dir)")
    args = ap.parse_args()
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        sys.exit("onnxruntime-genai is not installed: pip install onnxruntime-genai onnx_ir")
    import onnxruntime as ort
    import onnxruntime_genai as og

    from llmshrink.host import cpu_model
    from llmshrink.models import load_tokenizer

    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmshrink-speed-"))
    tok = load_tokenizer("smollm2-135m")
    text = (Path(__file__).parent / "data" / "prompt.txt").read_text()
    prompt = np.array(tok(text)["input_ids"][:PROMPT_TOKENS], np.int64)
    assert len(prompt) == PROMPT_TOKENS
    rows = []
    for precision in [p.strip() for p in args.precisions.split(",")]:
        ours_dir, theirs_dir = work / f"llmshrink-{precision}", work / f"genai-{precision}"
        if not ours_dir.exists():
            build_llmshrink(precision, ours_dir)
        if not theirs_dir.exists():
            build_genai(precision, theirs_dir, args.threads)
        ours = Llmshrink(ours_dir, args.threads)
        shapes = ours.b.decoder._kv_shapes  # the same model: same kv heads and head size in both graphs
        systems = {"llmshrink": ours, "onnxruntime-genai": Genai(theirs_dir, args.threads),
                   SAME_OURS: SameRunner(ours_dir / "model.onnx", args.threads, shapes),
                   SAME_THEIRS: SameRunner(theirs_dir / "model.onnx", args.threads, shapes)}
        res = {name: {"ttft": [], "tpot": [], "rep_tpot": []} for name in systems}
        for s in systems.values():  # warm-up
            s.run(prompt)
        for rep in range(args.reps):
            # Interleaved, alternating order (A B, B A, ...): whichever system runs
            # first after the other one pays for the other's cache footprint.
            order = list(systems.items()) if rep % 2 == 0 else list(systems.items())[::-1]
            for name, s in order:
                ttft, steps = s.run(prompt)
                res[name]["ttft"].append(ttft)
                res[name]["tpot"].extend(steps)
                res[name]["rep_tpot"].append(np.median(steps))
        for name in systems:
            r = res[name]
            rows.append((precision, name, np.median(r["ttft"]) * 1e3, np.percentile(r["ttft"], 90) * 1e3,
                         np.median(r["tpot"]) * 1e3, np.percentile(r["tpot"], 90) * 1e3,
                         sum(f.stat().st_size for f in (ours_dir if name in ("llmshrink", SAME_OURS) else theirs_dir).iterdir())
                         / 2**20, r))
    print(f"\n# Deployed speed — SmolLM2-135M-Instruct, batch 1, {PROMPT_TOKENS}-token prompt, greedy {NEW_TOKENS} tokens")
    print(f"# host: {cpu_model()}, {args.threads} threads, onnxruntime {ort.__version__}, onnxruntime-genai {og.__version__}, "
          f"{args.reps} interleaved reps")
    print(f"# command: python benchmarks/deployed_speed.py --reps {args.reps} --threads {args.threads} --precisions {args.precisions}\n")
    print("| precision | system | TTFT median ms | TTFT p90 | TPOT median ms | TPOT p90 | size MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.0f} |")
    by = {(r[0], r[1]): r for r in rows}

    def paired(a, b, key):  # median over reps of the per-rep ratio: drift of a shared host cancels
        return float(np.median(np.array(a[7][key]) / np.array(b[7][key])))

    print("\nRatios are medians over the interleaved reps of each rep's ratio (TPOT: of each rep's median step).")
    print("| precision | TTFT ratio llmshrink/genai | TPOT ratio llmshrink/genai | graphs alone (one runner): TTFT ratio "
          "| TPOT ratio |")
    print("|---|---|---|---|---|")
    for p in dict.fromkeys(r[0] for r in rows):
        a, b = by[(p, "llmshrink")], by[(p, "onnxruntime-genai")]
        c, d = by[(p, SAME_OURS)], by[(p, SAME_THEIRS)]
        print(f"| {p} | {paired(a, b, 'ttft'):.3f} | {paired(a, b, 'rep_tpot'):.3f} | {paired(c, d, 'ttft'):.3f} "
              f"| {paired(c, d, 'rep_tpot'):.3f} |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
