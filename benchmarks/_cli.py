"""What the benchmark scripts share: running ``llmshrink`` as a user does and reading its ``--json`` answer."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FULL = ("arc_easy_local", "boolq_local", "winogrande_local")
HELLASWAG, HELLASWAG_DOCS = "hellaswag_local", 1000


def sh(*args: str, check: bool = True) -> str:
    """Run ``llmshrink ARGS`` (this interpreter's), echo the command, return its stdout.

    stdout is the command's ``--json`` answer; its progress (stderr) passes through, so a long run
    can be watched. ``check=False`` keeps the answer of a command that exits non-zero on purpose
    (``validate`` outside its tolerance exits 4 and still prints its verdict).
    """
    print("$ llmshrink " + " ".join(args), file=sys.stderr)
    res = subprocess.run([sys.executable, "-m", "llmshrink", *args], check=check, stdout=subprocess.PIPE, text=True)
    return res.stdout


def machine_line() -> str:
    """Where and when the table was made: latency ratios move with the CPU (its ISA) and the table it was priced on."""
    from datetime import datetime, timezone

    from llmshrink.doctor import cpu_table_status
    from llmshrink.host import cpu_features, cpu_id, cpu_model

    t = cpu_table_status()
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_model()} ({cpu_id()}; {', '.join(cpu_features())}),"
            f" {os.cpu_count()} cores; cpu table {t.get('name')} ({t.get('kind')}, {t.get('date')}): {t.get('status')}")


def uniform_setup(out: Path, data_dir: str, model: str, fmt: str) -> tuple[Path, str, Path]:
    """``out`` with the local lm-eval tasks rendered from ``data_dir`` and a uniform ``fmt`` spec of ``model``
    (each made once): returns the tasks folder, the WikiText-2 test file and the spec file."""
    out.mkdir(parents=True, exist_ok=True)
    tasks_dir = out / "tasks"
    if not (tasks_dir / "arc_easy_local.yaml").is_file():
        subprocess.run([sys.executable, str(Path(data_dir) / "render.py"), str(tasks_dir)], check=True)
    spec = out / f"{fmt}.json"
    if not spec.is_file():
        sh("spec", "new", "--model", model, "--uniform", fmt, "--out", str(spec))
    return tasks_dir, str(Path(data_dir) / "wikitext2" / "wiki.test.raw"), spec


def timed_in_turn(a: Path, b: Path, label_a: str, label_b: str, rounds: int = 7) -> str:
    """``a``'s decode latency over ``b``'s, timed in turn both ways round (``validate --reference``), as a line.

    Each order alone can favour the bundle timed second on a shared VM (it drifts within a round); the
    geometric mean of both orders cancels that. Same graph, other codes: 1.000x predicted.
    """
    ratios = []
    for x, y in ((a, b), (b, a)):
        v = json.loads(sh("validate", str(x), "--reference", str(y), "--target", "cpu", "--rounds", str(rounds),
                          "--no-record", "--json", check=False))  # exit 4 (outside tolerance) still prints it
        ratios.append(v.get("_data", v))
    mean = (ratios[0]["measured_ratio"] / ratios[1]["measured_ratio"]) ** 0.5
    wl = ratios[0].get("workload") or {}
    wl = wl.get("_data", wl)
    return (f"latency, {label_a} / {label_b}, timed in turn ({wl.get('phase')}, ctx {wl.get('context')}, batch "
            f"{wl.get('batch')}; {rounds} rounds each way): {label_a} first {ratios[0]['measured_ratio']:.3f}x, "
            f"{label_b} first 1/{ratios[1]['measured_ratio']:.3f}x, geometric mean {mean:.3f}x (predicted 1.000x: "
            "same graph, other codes)")


def emit(lines: list[str], results: str | None) -> None:
    """Print a benchmark's table, and write it to ``results`` when given (``benchmarks/results/...``)."""
    text = "\n".join(lines)
    print(text)
    if results:
        Path(results).write_text(text + "\n")


def uniform_args(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark on one uniform spec of the default model (more are added by the caller)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="../shared/evaldata (read-only; tasks are rendered from it)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default="w4g32a8")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    return ap


def evaluate(bundle: Path, cache: Path, *, full: bool, tasks_dir: Path, wiki: str, ppl_tokens: int) -> dict:
    """Perplexity and task accuracies of ``bundle`` (read from ``cache`` when a previous run wrote it)."""
    if cache.is_file():
        got = json.loads(cache.read_text())
        if got.get("full", False) >= full:
            got["reused"] = True
            return got
    t0 = time.perf_counter()
    common = ("--include-path", str(tasks_dir), "--no-record", "--json")
    tasks = ("--tasks", ",".join(FULL)) if full else ()
    res = json.loads(sh("eval", str(bundle), *tasks, "--ppl", wiki, "--max-tokens", str(ppl_tokens), "--context", "512",
                        "--stride", "256", *common))
    acc = {t["task"]: t["metrics"]["acc"] for t in res.get("tasks") or ()}
    if full:
        hs = json.loads(sh("eval", str(bundle), "--tasks", HELLASWAG, "--limit", str(HELLASWAG_DOCS), *common))
        acc.update({t["task"]: t["metrics"]["acc"] for t in hs["tasks"]})
    got = {"ppl": res["perplexity"][0]["ppl"], "acc": acc, "full": full, "seconds": time.perf_counter() - t0}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(got, indent=1))
    return got


def run_children(child: str, modes: tuple[str, ...], argv) -> dict[str, dict]:
    """Run the script ``child`` once per mode, each in a fresh interpreter, one after the other; ``argv(mode)``
    gives its arguments. The child prints a JSON line last (``baseline``, ``peak``: bytes; ``seconds``)."""
    res = {}
    for mode in modes:
        print(f"{mode} ...", file=sys.stderr)
        out = subprocess.run([sys.executable, "-c", child, *argv(mode)], check=True, stdout=subprocess.PIPE, text=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def peak_table(res: dict[str, dict], expected: dict[str, int]) -> list[str]:
    """Rows of peak RSS per mode: absolute, above the child's baseline, the formula's ``expected``, time."""
    from llmshrink.units import human_bytes

    lines = [f"{'path':10}{'peak RSS':>12}{'above base':>12}{'expected':>12}{'time':>9}"]
    for m, r in res.items():
        lines.append(f"{m:10}{human_bytes(r['peak']):>12}{human_bytes(r['peak'] - r['baseline']):>12}"
                     f"{human_bytes(expected[m]):>12}{r['seconds']:8.0f}s")
    return lines
