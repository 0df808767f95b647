import pytest
import torch

from llmshrink.compressor.search import CHECKPOINT, SearchConfig, kd_loss, run_search
from llmshrink.compressor.space import SearchSpace
from llmshrink.compressor.supernet import Supernet
from llmshrink.errors import UsageError
from llmshrink.progress import Progress, Task


def _space(base):
    return SearchSpace(base, hidden=(32, 64), kv_groups=(1, 2), heads_per_group=(2,), head_dim=(16,),
                       mlp=(64, 96, 128), min_layers=2, formats=("fp32", "w4g32a8"),
                       lm_head_formats=("fp32", "w4g32a8")).validate()


@pytest.fixture(scope="module")
def calib():
    return torch.randint(3, 300, (16, 24), generator=torch.Generator().manual_seed(5))


def _cfg(**kw):
    base = dict(steps=6, batch_size=2, seq_len=24, weight_lr=1e-4, arch_lr=0.1, warmup_steps=1, settle_every=2,
                checkpoint_every=3, requant_every=3)
    return SearchConfig(**{**base, **kw})


def test_kd_loss_is_zero_for_the_teacher_and_positive_otherwise():
    t = torch.randn(2, 5, 11)
    assert float(kd_loss(t, t)) == pytest.approx(0, abs=1e-6)
    assert float(kd_loss(torch.randn(2, 5, 11), t)) > 0



@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_and_its_gradient_equal_kl_div_of_the_log_softmaxes(temperature):
    # kd_loss is a hand-written forward KL with its own backward; F.kl_div of both log-softmaxes is the definition
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(3)
    student = torch.randn(3, 7, 50, generator=gen, requires_grad=True)
    teacher = 3 * torch.randn(3, 7, 50, generator=gen)
    t = temperature
    ref = F.kl_div(F.log_softmax(student / t, -1).flatten(0, -2), F.log_softmax(teacher / t, -1).flatten(0, -2),
                   log_target=True, reduction="batchmean") * t * t
    got = kd_loss(student, teacher, t)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    g_got, = torch.autograd.grad(got, student)
    g_ref, = torch.autograd.grad(ref, student)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)

def test_a_tight_budget_pulls_expected_latency_down(tiny_hf, tiny_base, steady_table, calib):
    table, yaml_path = steady_table  # the per-session tiny table can rank subnets wrongly (see conftest)
    from llmshrink.compressor.budget import fastest_reachable
    from llmshrink.targets import load_target
    from llmshrink.targets.workload import Workload

    wl = Workload("decode", 1, 16)
    net = Supernet(tiny_hf, _space(tiny_base))
    start = net.expected_latency(table, wl, net.probs()).item()
    fastest, _ = fastest_reachable(net.space, load_target(str(yaml_path)), wl, table)
    assert fastest < start
    res = run_search(net, tiny_hf, calib, table=table, workload=wl, budget_ms=fastest,
                     config=_cfg(steps=12, lambda_latency=50.0))
    # at least half of the reachable way down (a tiny model's latency is mostly fixed overhead)
    assert res.history[-1].latency_ms < start - 0.5 * (start - fastest)
    # dual ascent: the multiplier grows while the expectation is over budget, shrinks while under
    for a, b in zip(res.history[1:-1], res.history[2:], strict=True):
        assert (b.lambda_latency > a.lambda_latency) == (a.latency_ms > fastest), (a, b)
    assert [h.step for h in res.history] == list(range(1, 13))
    assert all(h.settled <= h.decisions for h in res.history)
    loose = Supernet(tiny_hf, _space(tiny_base))
    run_search(loose, tiny_hf, calib, table=table, workload=wl, budget_ms=10 * start,
               config=_cfg(steps=12, lambda_latency=50.0))
    assert loose.expected_latency(table, wl, loose.probs()).item() > res.history[-1].latency_ms


class _Killer(Progress):
    """Raises after ``n`` completed steps, like a SIGKILL between two steps."""

    def __init__(self, n):
        self.n = n

    def _make_task(self, description, total):
        killer = self

        class T(Task):
            def advance(self, n=1, **fields):
                super().advance(n, **fields)
                if description.startswith("Search") and self.completed > killer.n:
                    raise KeyboardInterrupt

        return T(description, total)


def test_resume_continues_from_the_checkpoint_and_ends_where_an_unbroken_run_ends(tiny_hf, tiny_base, tiny_table,
                                                                                   calib, tmp_path):
    table, _ = tiny_table
    from llmshrink.targets.workload import Workload

    wl, cfg = Workload("decode", 1, 16), _cfg()
    kw = dict(table=table, workload=wl, budget_ms=0.01, config=cfg)
    whole = Supernet(tiny_hf, _space(tiny_base))
    unbroken = run_search(whole, tiny_hf, calib, **kw)
    broken = Supernet(tiny_hf, _space(tiny_base))
    with pytest.raises(KeyboardInterrupt):
        run_search(broken, tiny_hf, calib, checkpoint_dir=tmp_path, progress=_Killer(4), **kw)
    assert (tmp_path / CHECKPOINT).is_file()
    fresh = Supernet(tiny_hf, _space(tiny_base))
    res = run_search(fresh, tiny_hf, calib, checkpoint_dir=tmp_path, resume=True, **kw)
    assert res.resumed_from == 3 and [h.step for h in res.history] == list(range(1, 7))
    assert res.moves == unbroken.moves  # the start and the moves measured before the break come back too
    for (name, a), b in zip(whole.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(UsageError, match="other search settings"):
        run_search(Supernet(tiny_hf, _space(tiny_base)), tiny_hf, calib, checkpoint_dir=tmp_path, resume=True,
                   **{**kw, "config": _cfg(arch_lr=0.2)})
    with pytest.raises(UsageError, match="Nothing to resume"):
        run_search(Supernet(tiny_hf, _space(tiny_base)), tiny_hf, calib, checkpoint_dir=tmp_path / "x",
                   resume=True, **kw)


def test_a_checkpoint_holds_the_weights_only_when_the_search_trains_them(tiny_hf, tiny_base, tiny_table, calib,
                                                                          tmp_path):
    """Frozen weights are rebuilt from the model on resume: the checkpoint keeps the logits and alive masks (a
    sharded supernet's weights are whole on no rank). Trained ones are saved; cached residuals never are."""
    table, _ = tiny_table
    from llmshrink.targets.workload import Workload

    kw = dict(table=table, workload=Workload("decode", 1, 16), budget_ms=0.01)
    saved = {}
    for lr in (0.0, 1e-3):
        net = Supernet(tiny_hf, _space(tiny_base))
        run_search(net, tiny_hf, calib, config=_cfg(steps=2, weight_lr=lr, checkpoint_every=2, requant_every=1),
                   checkpoint_dir=tmp_path / str(lr), **kw)
        saved[lr] = torch.load(tmp_path / str(lr) / CHECKPOINT, weights_only=True)["net"]
        assert not any("resid" in k for k in net.state_dict())
        assert any(p.requires_grad for p in net.weight_parameters()) == bool(lr)
    assert set(saved[0.0]) == {f"{w}{k}" for w in ("alpha.", "alive_") for k in net.alpha}
    assert set(saved[0.0]) < set(saved[1e-3]) and "layers.0.q" in saved[1e-3]


def test_each_step_draws_one_subnet_per_sample_and_weights_stay_pretrained_by_default(tiny_hf, tiny_base, tiny_table,
                                                                                       calib, monkeypatch):
    table, _ = tiny_table
    from llmshrink.targets.workload import Workload

    net = Supernet(tiny_hf, _space(tiny_base))
    before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith(("alpha", "alive"))}
    draws = []
    real = Supernet.sample
    monkeypatch.setattr(Supernet, "sample", lambda self, *a: draws.append(1) or real(self, *a))
    kw = dict(table=table, workload=Workload("decode", 1, 16), budget_ms=0.01)
    run_search(net, tiny_hf, calib, config=_cfg(steps=3, samples=2, weight_lr=0.0, warmup_steps=0), **kw)
    assert len(draws) == 3 * 2  # two subnets per step, no weight half
    for k, v in net.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k], msg=k)
    assert any(not torch.equal(a, torch.zeros_like(a)) for a in net.arch_parameters())
    draws.clear()
    trained = Supernet(tiny_hf, _space(tiny_base))
    run_search(trained, tiny_hf, calib, config=_cfg(steps=3, samples=2, weight_lr=1e-3, warmup_steps=0), **kw)
    assert len(draws) == 3 * 2 * 2  # and a weight half, also sampled twice
    assert any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items() if k in before)


def test_nothing_settles_before_settle_after(tiny_hf, tiny_base, tiny_table, calib):
    table, _ = tiny_table
    from llmshrink.targets.workload import Workload

    kw = dict(table=table, workload=Workload("decode", 1, 16), budget_ms=0.01)
    cfg = _cfg(steps=8, settle_every=2, settle_after=6, entropy_threshold=0.99, prune_floor=0.4, warmup_steps=0)
    res = run_search(Supernet(tiny_hf, _space(tiny_base)), tiny_hf, calib, config=cfg, **kw)
    first = res.history[0].settled
    assert all(h.settled == first for h in res.history[:5])
    assert res.history[5].settled > first  # at step 6 the (lenient) threshold freezes decisions


def test_an_architecture_step_moves_no_logit_further_than_the_clipped_gradient_allows(tiny_hf, tiny_base, tiny_table,
                                                                                       calib):
    from llmshrink.compressor.search import optimizers, train_step
    from llmshrink.targets.workload import Workload

    table, _ = tiny_table
    moved = {}
    for clip in (0.01, 0.0):
        net = Supernet(tiny_hf, _space(tiny_base))
        cfg = _cfg(arch_lr=1.0, arch_grad_clip=clip, weight_lr=0.0)
        opt_w, opt_a = optimizers(net, cfg)
        before = [a.detach().clone() for a in net.arch_parameters()]
        # a huge multiplier on a budget far below anything: the penalty's gradient dwarfs the clip
        train_step(net, tiny_hf, calib[:2], calib[2:4], opt_w, opt_a, cfg, tau=1.0,
                   generator=torch.Generator().manual_seed(0), table=table, workload=Workload("decode", 1, 16),
                   budget_ms=1e-4, lambda_latency=1e4)
        moved[clip] = max(float((a - b).abs().max()) for a, b in zip(net.arch_parameters(), before, strict=True))
    assert 0 < moved[0.01] <= 0.01 + 1e-7 < moved[0.0]


def _two_steps(net, hf, calib, table, cfg) -> list[float]:
    from llmshrink.compressor.search import train_step
    from llmshrink.targets.workload import Workload

    # plain SGD on both halves: an update is its gradient (Adam's first step, ~lr * sign, would hide its scale)
    opt_w = torch.optim.SGD(net.weight_parameters(), lr=cfg.weight_lr)
    opt_a = torch.optim.SGD(net.arch_parameters(), lr=cfg.arch_lr)
    gen, kds = torch.Generator().manual_seed(3), []
    for k in range(2):  # a second step: gradients left over from the first must not leak into it
        kd, *_ = train_step(net, hf, calib[8 * k:8 * k + 4], calib[8 * k + 4:8 * k + 8], opt_w, opt_a, cfg, tau=1.0,
                            generator=gen, table=table, workload=Workload("decode", 1, 16), budget_ms=0.01)
        kds.append(float(kd))
    return kds


def test_recomputing_steps_make_the_same_updates(tiny_hf, tiny_base, tiny_table, calib):
    """Recompute (per-sample backwards, blocks checkpointed) changes what is kept, not the steps: after two
    steps the trained weights, the architecture logits and their last gradients are where the whole graph's
    backward puts them."""
    table, _ = tiny_table
    cfg = _cfg(samples=2, batch_size=4, weight_lr=1e-1, arch_lr=1.0, arch_grad_clip=0.0)
    nets, kds = [], []
    for recompute in (False, True):
        net = Supernet(tiny_hf, _space(tiny_base))
        net.recompute = recompute
        kds.append(_two_steps(net, tiny_hf, calib, table, cfg))
        nets.append(net)
    assert kds[0] == pytest.approx(kds[1], rel=1e-5)
    fresh, moved = dict(Supernet(tiny_hf, _space(tiny_base)).named_parameters()), []
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)
        if name in fresh and not torch.equal(a, fresh[name]):  # (cached residuals are made by the first step)
            moved.append(name)
    # the steps did move logits and weights (else equality says nothing)
    assert any(n.startswith("alpha") for n in moved) and any(n.startswith("layers") for n in moved)


def test_a_recomputing_forward_keeps_a_fraction_of_the_tensors_for_its_backward(tiny_hf, tiny_base):
    """What the memory saving rests on: with recompute, a sampled forward's blocks keep only their inputs
    for the backward, not their effective weights and activations."""
    kept = {}
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    for recompute in (False, True):
        net = Supernet(tiny_hf, _space(tiny_base))
        net.recompute = recompute
        nbytes = []

        def pack(t, nbytes=nbytes):
            nbytes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = net(ids, net.sample(1.0, torch.Generator().manual_seed(0)))
        logits.sum().backward()  # and the recomputation runs in it
        kept[recompute] = sum(nbytes)
        assert net.alpha["mlp"].grad is not None and net.alpha["mlp"].grad.abs().sum() > 0
    assert kept[True] < 0.5 * kept[False]
