"""Worker of ``test_distributed.py``: a search and a recovery of the tiny Llama, run alone or under torchrun.

    python distributed_worker.py OUT.json CKPT_DIR [--die-at N] [--resume] [--shard] [--recompute]
    python -m torch.distributed.run --standalone --nproc-per-node 2 distributed_worker.py OUT.json CKPT_DIR ...

Rank 0 writes OUT.json: the chosen spec's fingerprint, the search's per-step KD and expected latency, the
architecture logits, and recovery's losses. ``--die-at N``: rank 0 SIGKILLs itself after step N + 1 of the
search (its checkpoint of step N, taken every 2 steps, is on disk). ``--shard``: the supernet's weights sharded
over the ranks with FSDP (:meth:`Supernet.shard`); rank 0 also writes how many of the weights it holds.
``--recompute``: the search's lean steps (per-sample backward, blocks recomputed in it; :func:`train_step`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from importlib.resources import files
from pathlib import Path


def main() -> None:
    out, ckpt_dir = sys.argv[1], sys.argv[2]
    die_at = int(sys.argv[sys.argv.index("--die-at") + 1]) if "--die-at" in sys.argv else None
    resume = "--resume" in sys.argv
    shard = "--shard" in sys.argv
    recompute = "--recompute" in sys.argv

    import torch

    from llmshrink import distributed as dist
    from llmshrink.compressor.materialize import materialize
    from llmshrink.compressor.model import SavedModel
    from llmshrink.compressor.recover import RecoveryConfig, recover
    from llmshrink.compressor.search import SearchConfig, run_search
    from llmshrink.compressor.space import SearchSpace
    from llmshrink.compressor.supernet import Supernet
    from llmshrink.progress import Progress, Task
    from llmshrink.spec import BaseShape
    from llmshrink.targets.table import load_table
    from llmshrink.targets.workload import Workload
    from llmshrink.testing import tiny_llama

    dist.init_from_env()
    torch.set_num_threads(1)  # two ranks on two cores
    hf = tiny_llama()
    base = BaseShape.from_config(hf.config)
    space = SearchSpace(base, hidden=(64,), kv_groups=(1, 2), heads_per_group=(2,), head_dim=(16,),
                        mlp=(64, 96, 128), min_layers=2, formats=("fp32", "w4g32a8"),
                        lm_head_formats=("fp32", "w4g32a8")).validate()
    table = load_table(str(files("llmshrink.targets") / "tables" / "cpu-smollm2-135m.json.gz"))
    calib = torch.randint(3, 250, (24, 24), generator=torch.Generator().manual_seed(5))
    cfg = SearchConfig(steps=8, batch_size=4, samples=4, seq_len=24, arch_lr=0.1, settle_every=2, settle_after=4,
                       checkpoint_every=2, requant_every=2)

    class Killer(Progress):
        def _make_task(self, description, total):
            class T(Task):
                def advance(self, n=1, **fields):
                    super().advance(n, **fields)
                    if die_at is not None and dist.is_main() and description.startswith("Search") \
                            and self.completed > die_at:
                        os.kill(os.getpid(), signal.SIGKILL)

            return T(description, total)

    net = Supernet(hf, space)
    # the run's quantizer, as the joint search uses it: sharding must take its weights layer by layer too
    # ... read a layer at a time from where it was saved, as compress gives it
    saved = Path(ckpt_dir).with_name(f"{Path(ckpt_dir).name}-quant-{dist.rank()}")
    materialize(hf, space.largest("w4g32a8"), calib=calib[:8], quantizer="gptq").save(saved)
    net.use_quantized({"w4g32a8": SavedModel(saved)})
    res = run_search(net, hf, calib, table=table, workload=Workload("decode", 1, 16), budget_ms=0.01, config=cfg,
                     checkpoint_dir=ckpt_dir, resume=resume, shard=shard, recompute=recompute,
                     progress=Killer())
    # elements of the weights and residuals this rank holds (its shards, when sharded)
    held = sum(getattr(p, "_local_tensor", p).numel() for p in net.parameters()
               if all(p is not a for a in net.arch_parameters()))
    spec = net.argmax_spec()
    rec = recover(hf, spec, calib[:20], held_out=calib[20:], quantizer="rtn",
                  config=RecoveryConfig(steps=4, batch_size=4, seq_len=24, rows=20, bf16="off"))
    if dist.is_main():
        with open(out, "w") as f:
            json.dump({"world": dist.world_size(), "spec": spec.fingerprint(), "resumed_from": res.resumed_from,
                       "kd": [h.kd for h in res.history], "latency": [h.latency_ms for h in res.history],
                       "logits": {k: v.tolist() for k, v in net.alpha.items()}, "held": held,
                       "recovery": [h.kd for h in rec.history], "kd_after": rec.kd_after}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
