"""One recovery step on the default model, with the distillation loss written two ways, timed in turn.

* ``kl_div`` -- the textbook form: ``F.kl_div`` of the student's and the teacher's log-softmaxes (what
  ``search.kd_loss`` computed before 2026-12-01);
* ``kd_loss`` -- ``search.kd_loss`` as it is: ``Σp·log p − Σp·s + logsumexp(s)`` with its own backward.

Each round times, for both in turn, the loss alone (forward and backward on ``[batch, seq, vocab]`` logits) and a
whole step of mode ``scales`` as ``recover`` runs it (teacher forward, student forward and backward, AdamW), bf16
autocast where the CPU has it. The student is the uniform spec rounded to nearest (a step costs the same whatever
the codes, and RTN needs no calibration text). Medians over rounds; the ratio is kd_loss / kl_div.

    python benchmarks/recovery_step.py [--format w4g32a8] [--rounds 7] [--batch 4] [--seq 128]
        [--results benchmarks/results/recovery_step_cpu.txt]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _cli import emit


def kl_div(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s = F.log_softmax(student.float(), -1).flatten(0, -2)
    q = F.log_softmax(teacher.float(), -1).flatten(0, -2)
    return F.kl_div(s, q, log_target=True, reduction="batchmean")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default="w4g32a8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--results", default=None)
    args = ap.parse_args()

    from llmshrink.compressor.materialize import materialize
    from llmshrink.compressor.recover import RecoveryConfig, _student, use_bf16
    from llmshrink.compressor.search import kd_loss
    from llmshrink.host import cpu_features, cpu_model
    from llmshrink.models import load_model, resolve_model
    from llmshrink.spec import BaseShape, SubnetSpec

    src = resolve_model(args.model)
    hf = load_model(src)
    spec = SubnetSpec.uniform(BaseShape.from_config(hf.config), args.format, model=src.describe())
    student = _student(materialize(hf, spec, quantizer="rtn"), RecoveryConfig())
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0, foreach=True)  # lr 0: every round times the same model
    bf16 = use_bf16("auto")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, hf.config.vocab_size, (args.batch, args.seq), generator=gen)
    vocab = hf.config.vocab_size
    losses = {"kl_div": kl_div, "kd_loss": kd_loss}

    def loss_alone(fn) -> float:
        s = torch.randn(args.batch, args.seq, vocab, generator=gen, requires_grad=True)
        t = torch.randn(args.batch, args.seq, vocab, generator=gen)
        t0 = time.perf_counter()
        fn(s, t).backward()
        return time.perf_counter() - t0

    def step(fn) -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            target = F.log_softmax(hf(input_ids=ids, use_cache=False).logits[..., :vocab].float(), -1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = student(ids)[0]
        loss = fn(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    for fn in losses.values():  # warm-up
        loss_alone(fn)
        step(fn)
    times = {(k, what): [] for k in losses for what in ("loss", "step")}
    for r in range(args.rounds):
        order = list(losses.items()) if r % 2 == 0 else list(losses.items())[::-1]
        for name, fn in order:
            times[(name, "loss")].append(loss_alone(fn))
            times[(name, "step")].append(step(fn))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"$ python benchmarks/recovery_step.py --format {args.format} --rounds {args.rounds} --batch {args.batch} "
             f"--seq {args.seq}",
             f"on {cpu_model()} ({', '.join(cpu_features())}); {torch.get_num_threads()} threads; model {args.model}, "
             f"uniform {args.format}, mode scales, bf16 autocast {'on' if bf16 else 'off'}; logits "
             f"[{args.batch}, {args.seq}, {vocab}]; medians of {args.rounds} rounds, the two losses in turn",
             "",
             f"{'':24}{'kl_div':>10}{'kd_loss':>10}{'ratio':>8}"]
    for what, label in (("loss", "loss, forward + backward"), ("step", "whole recovery step")):
        a, b = med[("kl_div", what)], med[("kd_loss", what)]
        lines.append(f"{label:24}{a:9.3f}s{b:9.3f}s{b / a:8.3f}")
    emit(lines, args.results)


if __name__ == "__main__":
    main()
