"""Deployed speed: llmshrink's ort bundle vs onnxruntime-genai's model builder, side by side.

Workload: SmolLM2-135M-Instruct, batch 1, a 133-token prompt, greedy decode of
64 tokens; time to first token (TTFT) and time per output token (TPOT),
medians over interleaved repetitions in alternating order (A B, B A, ...),
same thread count.
Each system runs as its users run it: llmshrink through its OrtDecoder,
onnxruntime-genai through og.Generator (shared KV buffer).

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
        t0 = time.perf_counter()
        kv = self.b.decoder.kv_session(PROMPT_TOKENS + NEW_TOKENS)
        logits = kv.step(prompt.reshape(1, -1), last_only=True)
        nxt = int(logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(NEW_TOKENS - 1):
            t = time.perf_counter()
            logits = kv.step(np.array([[nxt]], np.int64))
            nxt = int(logits[0, -1].argmax())
            steps.append(time.perf_counter() - t)
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

    from llmshrink.doctor import cpu_model
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
        systems = {"llmshrink": Llmshrink(ours_dir, args.threads), "onnxruntime-genai": Genai(theirs_dir, args.threads)}
        res = {name: {"ttft": [], "tpot": []} for name in systems}
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
        for name in systems:
            r = res[name]
            rows.append((precision, name, np.median(r["ttft"]) * 1e3, np.percentile(r["ttft"], 90) * 1e3,
                         np.median(r["tpot"]) * 1e3, np.percentile(r["tpot"], 90) * 1e3,
                         sum(f.stat().st_size for f in (ours_dir if name == "llmshrink" else theirs_dir).iterdir()) / 2**20))
    print(f"\n# Deployed speed — SmolLM2-135M-Instruct, batch 1, {PROMPT_TOKENS}-token prompt, greedy {NEW_TOKENS} tokens")
    print(f"# host: {cpu_model()}, {args.threads} threads, onnxruntime {ort.__version__}, onnxruntime-genai {og.__version__}, "
          f"{args.reps} interleaved reps")
    print(f"# command: python benchmarks/deployed_speed.py --reps {args.reps} --threads {args.threads} --precisions {args.precisions}\n")
    print("| precision | system | TTFT median ms | TTFT p90 | TPOT median ms | TPOT p90 | size MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.0f} |")
    by = {(r[0], r[1]): r for r in rows}
    print("\n| precision | TTFT ratio llmshrink/genai | TPOT ratio llmshrink/genai |")
    print("|---|---|---|")
    for p in dict.fromkeys(r[0] for r in rows):
        a, b = by[(p, "llmshrink")], by[(p, "onnxruntime-genai")]
        print(f"| {p} | {a[2] / b[2]:.3f} | {a[4] / b[4]:.3f} |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
