"""Supernet training throughput: vectorized soft masks vs a per-candidate (mixed-op) loop, same step.

Both supernets hold the same weights, space and architecture logits and
compute the same expectation (tests/unit/compressor/test_supernet.py checks
that); they differ only in how: the vectorized one builds one survival mask
per decision and one expected weight per linear, the loop one runs a
sub-block per MLP width, per head configuration and per format and sums
them. A step is what the search runs (``search.train_step``): a weight update
on one batch, an architecture update with the latency and parameter
penalties on another (teacher targets are computed before the timed step,
as the search caches them). Steps alternate between the two
implementations so machine noise hits both alike; the table gives the
median step time, tokens per second (both halves' tokens) and the ratio.
Quantization residuals are cached in both (refreshed every few steps by the
search, outside the timed step).

    python benchmarks/search_throughput.py [--model smollm2-135m] [--steps 6] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per implementation (after one warm-up)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from llmshrink.compressor.search import SearchConfig, optimizers, train_step
    from llmshrink.compressor.space import default_space
    from llmshrink.compressor.supernet import Supernet
    from llmshrink.models import load_model
    from llmshrink.spec import BaseShape
    from llmshrink.targets import load_target
    from llmshrink.targets.predict import table_for

    torch.manual_seed(args.seed)
    target = load_target(args.target)
    table = table_for(target)
    hf = load_model(args.model).float().eval()
    base = BaseShape.from_config(hf.config)
    space = default_space(base, target.formats, search_formats=target.search_formats)
    # the expected (soft) network of the paper: a hard-sampled step weights one candidate per decision
    cfg = SearchConfig(batch_size=args.batch, seq_len=args.seq, sampling="soft")
    gen = torch.Generator().manual_seed(args.seed)
    vocab = hf.config.vocab_size
    nets = {"vectorized masks": Supernet(hf, space), "per-candidate loop": Supernet(hf, space, vectorized=False)}
    g = torch.Generator().manual_seed(args.seed + 1)
    logits = [torch.randn(a.shape, generator=g) for a in nets["vectorized masks"].arch_parameters()]
    opts = {}
    for name, net in nets.items():
        with torch.no_grad():
            for a, v in zip(net.arch_parameters(), logits, strict=True):
                a.copy_(v)  # the same (non-uniform) probabilities in both
        opts[name] = optimizers(net, cfg)
    budget = 0.7 * float(nets["vectorized masks"].expected_latency(table, target.default_workload,
                                                                   nets["vectorized masks"].probs()).detach())
    times: dict[str, list[float]] = {n: [] for n in nets}
    for step in range(args.steps + 1):
        ids_w = torch.randint(100, vocab, (args.batch, args.seq), generator=gen)
        ids_a = torch.randint(100, vocab, (args.batch, args.seq), generator=gen)
        with torch.no_grad():  # the search reads cached teacher targets (compressor.teacher), so steps do here too
            targets = tuple(hf(input_ids=i, use_cache=False).logits for i in (ids_w, ids_a))
        for name, net in nets.items():
            t0 = time.perf_counter()
            train_step(net, hf, ids_w, ids_a, *opts[name], cfg, tau=1.0, generator=gen, table=table,
                       workload=target.default_workload, budget_ms=budget, params_budget=None, targets=targets)
            dt = time.perf_counter() - t0
            if step:  # the first step of each is a warm-up
                times[name].append(dt)
            print(f"step {step} {name}: {dt:.2f} s", file=sys.stderr)
    tokens = 2 * args.batch * args.seq
    print(f"# {' '.join(sys.argv)}")
    print(f"# model {args.model}, space: {space.decisions()} (per layer x {base.num_layers}), "
          f"batch {args.batch} x {args.seq} tokens per half-step, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'implementation':<22} {'median step s':>14} {'tokens/s':>10}")
    med = {n: statistics.median(t) for n, t in times.items()}
    for name, m in med.items():
        print(f"{name:<22} {m:>14.2f} {tokens / m:>10.0f}")
    print(f"speed-up of vectorized masks: {med['per-candidate loop'] / med['vectorized masks']:.2f}x "
          f"(median of {args.steps} alternating steps each)")


if __name__ == "__main__":
    main()
