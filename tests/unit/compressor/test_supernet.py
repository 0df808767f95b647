import math
from dataclasses import replace

import pytest
import torch

from llmshrink.compressor import quant
from llmshrink.compressor.importance import measure_importance
from llmshrink.compressor.materialize import materialize
from llmshrink.compressor.space import SearchSpace
from llmshrink.compressor.supernet import Supernet, fake_quant, width_mask
from llmshrink.formats import parse_format
from llmshrink.spec import LINEARS

FORMATS = ("fp32", "w4g32a8", "w8g32", "w4g32z", "w8a8")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(2))


def _space(base, formats=FORMATS):
    # the tiny Llama: 4 heads in 2 kv groups of head size 16; one head (16 wide) suits no 32-group
    grouped = any(parse_format(f).group_size for f in formats)
    return SearchSpace(base, hidden=(32, 64), kv_groups=(1, 2), heads_per_group=(2,) if grouped else (1, 2),
                       head_dim=(16,), mlp=(64, 96, 128), min_layers=2, formats=formats,
                       lm_head_formats=formats).validate()


def _pin(net, seed):
    """Random logits, then freeze every decision at its argmax: probabilities exactly one-hot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.copy_(torch.randn(a.shape, generator=g) * 3)
    net.settle(threshold=1.01)
    assert net.settled()[0] == net.settled()[1]


def test_width_mask_is_survival_probability():
    p = torch.tensor([0.2, 0.5, 0.3])
    m = width_mask(p, torch.tensor([2, 4, 6]), 6)
    torch.testing.assert_close(m, torch.tensor([1, 1, 0.8, 0.8, 0.3, 0.3]))


@pytest.mark.parametrize("seed", range(4))
def test_one_hot_supernet_is_the_extracted_fp32_subnet(tiny_hf, tiny_base, ids, seed):
    imp = measure_importance(tiny_hf, [ids])
    net = Supernet(tiny_hf, _space(tiny_base, ("fp32",)), imp)
    _pin(net, seed)
    spec = net.argmax_spec()
    spec.validate()
    with torch.no_grad():
        got = net(ids)
    want = materialize(tiny_hf, spec)(ids)[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_one_hot_supernet_quantizes_like_the_extracted_subnet(tiny_hf, tiny_base, ids, seed, monkeypatch):
    # the exporter clips scales; with clipping off both quantize alike (identity orders: same groups)
    monkeypatch.setattr(quant, "CLIP_GRID", (1.0,))
    net = Supernet(tiny_hf, _space(tiny_base))
    _pin(net, 10 + seed)
    spec = net.argmax_spec()
    with torch.no_grad():
        got = net(ids)
    want = materialize(tiny_hf, spec)(ids)[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("seed", range(2))
def test_search_rounds_on_the_exports_clipped_grid(tiny_hf, tiny_base, ids, seed):
    # clip search on (the default): where no width is pruned, every group of the subnet is a group of the
    # pretrained weight, so the search's fixed grids are exactly the ones the export computes
    space = SearchSpace(tiny_base, hidden=(64,), kv_groups=(2,), heads_per_group=(2,), head_dim=(16,), mlp=(128,),
                        min_layers=2, formats=("w4g32a8", "w4g32z", "w8g32"),
                        lm_head_formats=("w4g32a8", "w8g32")).validate()
    net = Supernet(tiny_hf, space)
    _pin(net, 30 + seed)
    spec = net.argmax_spec()
    with torch.no_grad():
        got = net(ids)
    torch.testing.assert_close(got, materialize(tiny_hf, spec, quantizer="rtn")(ids)[0], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_a_format_is_a_candidate_only_where_its_group_fits(tiny_hf, tiny_base, ids, seed, monkeypatch):
    # a 64-group divides the MLP widths (64, 128) but not the hidden 32 or o_proj's 32: down_proj only
    monkeypatch.setattr(quant, "CLIP_GRID", (1.0,))
    space = SearchSpace(tiny_base, hidden=(32, 64), kv_groups=(1, 2), heads_per_group=(2,), head_dim=(16,),
                        mlp=(64, 128), min_layers=2, formats=("w4g32a8", "w4g64a8"),
                        lm_head_formats=("w4g32a8", "w4g64a8")).validate()
    assert space.linear_formats("down_proj") == ("w4g32a8", "w4g64a8")
    assert space.linear_formats("q_proj") == space.linear_formats("o_proj") == ("w4g32a8",)
    net = Supernet(tiny_hf, space)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):  # sampled subnets never draw a format where it is not offered
        pr = net.sample(1.0, gen)
        assert float(pr.prec[:, :6, 1].abs().sum()) == 0 and float(pr.lm_head[1]) == 0
    _pin(net, 20 + seed)
    spec = net.argmax_spec()
    spec.validate()
    with torch.no_grad():
        got = net(ids)
    torch.testing.assert_close(got, materialize(tiny_hf, spec)(ids)[0], atol=1e-4, rtol=1e-3)


def test_fake_quant_matches_the_exporters_quantizer_without_clipping(monkeypatch):
    monkeypatch.setattr(quant, "CLIP_GRID", (1.0,))
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for name in FORMATS[1:]:
        f = parse_format(name)
        torch.testing.assert_close(fake_quant(w, f), quant.quantize_weight(w, f).dequantize())


def test_gradients_reach_weights_and_every_architecture_logit(tiny_hf, tiny_base, ids):
    net = Supernet(tiny_hf, _space(tiny_base, ("fp32", "w8a8")))
    pr = net.probs(tau=1.0)
    out = net(ids, pr)
    loss = out.pow(2).mean() + net.expected_params(pr) / 1e6
    loss.backward()
    for name, a in net.alpha.items():
        assert a.grad is not None and a.grad.abs().sum() > 0, name
    assert net.layers[0].q.grad.abs().sum() > 0 and net.embed.grad.abs().sum() > 0


def test_settling_freezes_low_entropy_decisions_and_skips_dropped_blocks(tiny_hf, tiny_base, ids):
    net = Supernet(tiny_hf, _space(tiny_base, ("fp32",)))
    assert net.settled()[0] == 7 * tiny_base.num_layers + 1  # one format: every precision is settled already
    with torch.no_grad():
        net.alpha["keep"][1] = torch.tensor([8.0, -8.0])  # block 1: certainly dropped
        net.alpha["mlp"][0] = torch.tensor([8.0, -8.0, -8.0])  # layer 0: certainly the narrowest MLP
    before = net.settled()[0]
    assert net.settle(threshold=0.05) == 2
    assert net.settled()[0] == before + 2
    assert not net.alive("keep")[1, 1] and net._top("mlp", 0) == 64
    spec = net.argmax_spec()
    assert not spec.layers[1].keep and spec.layers[0].intermediate_size == 64
    with torch.no_grad():
        out = net(ids)
    assert torch.isfinite(out).all()


def test_settling_never_drops_below_min_layers(tiny_hf, tiny_base):
    net = Supernet(tiny_hf, _space(tiny_base, ("fp32",)))
    with torch.no_grad():
        net.alpha["keep"].copy_(torch.tensor([[5.0, -5.0], [5.0, -4.0], [5.0, -3.0], [5.0, -6.0]]))
    net.settle(threshold=1.01)
    assert net.alive("keep")[:, 1].tolist() == [False, True, True, False]  # the two likeliest kept
    assert [ls.keep for ls in net.argmax_spec().layers] == [False, True, True, False]


def test_expected_latency_at_one_hot_is_the_prediction_of_the_extracted_spec(tiny_hf, tiny_base, tiny_table):
    from llmshrink.targets.predict import predict
    from llmshrink.targets.profile import load_target

    table, yaml_path = tiny_table
    target = load_target(str(yaml_path))
    net = Supernet(tiny_hf, _space(tiny_base, ("fp32", "w4g32a8")))
    for seed in range(3):
        _pin(net, 20 + seed)
        spec = net.argmax_spec()
        want = predict(spec, target, table=table).total_ms
        got = net.expected_latency(table, target.default_workload, net.probs()).item()
        assert got == pytest.approx(want, rel=1e-6)
        params = net.expected_params(net.probs()).item()
        assert params == materialize(tiny_hf, spec).num_params - _norms(spec)
        net.alive_keep.fill_(True)
        for k in ("hidden", "kv", "hpg", "mlp", "prec", "lm_head"):
            net.alive(k).fill_(True)


def _norms(spec):
    """Norm weights, which the search's parameter count leaves out."""
    return spec.hidden_size * (2 * len(spec.kept_layers()) + 1)


def test_log_prob_is_highest_for_the_argmax_spec_and_minus_inf_outside_the_space(tiny_hf, tiny_base):
    from dataclasses import replace

    net = Supernet(tiny_hf, _space(tiny_base))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.copy_(torch.randn(a.shape, generator=g))
    best = net.argmax_spec()
    top = net.log_prob(best)
    assert top < 0
    layers = list(best.layers)
    layers[0] = replace(layers[0], intermediate_size=96 if layers[0].intermediate_size != 96 else 64)
    assert net.log_prob(replace(best, layers=tuple(layers))) < top
    layers[0] = replace(layers[0], intermediate_size=100)
    assert net.log_prob(replace(best, layers=tuple(layers))) == float("-inf")


def test_per_candidate_loop_computes_the_same_expectation(tiny_hf, tiny_base, ids):
    space = SearchSpace(tiny_base, hidden=(32, 64), kv_groups=(1, 2), heads_per_group=(2,), head_dim=(16,),
                        mlp=(64, 96, 128), min_layers=2, formats=("fp32", "w4g32", "w8g32"),
                        lm_head_formats=("fp32", "w8g32")).validate()
    vec, loop = Supernet(tiny_hf, space), Supernet(tiny_hf, space, vectorized=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for a, b in zip(vec.arch_parameters(), loop.arch_parameters(), strict=True):
            a.copy_(torch.randn(a.shape, generator=g))
            b.copy_(a)
    torch.testing.assert_close(vec(ids), loop(ids), atol=1e-4, rtol=1e-4)


def test_settling_judges_the_tempered_distribution_the_forward_uses(tiny_hf, tiny_base):
    net = Supernet(tiny_hf, _space(tiny_base, ("fp32",)))
    with torch.no_grad():
        net.alpha["mlp"][0] = torch.tensor([1.5, 0.0, 0.0])  # a lean, not a certainty, at temperature 1
    assert net.settle(threshold=0.2, tau=1.0) == 0 and int(net.alive("mlp")[0].sum()) == 3
    assert net.entropies(0.2)["mlp"][0] < 0.2 < net.entropies(1.0)["mlp"][0]
    assert net.settle(threshold=0.2, tau=0.2) == 1 and net._top("mlp", 0) == int(net.cands_mlp[0])


def test_a_sample_is_one_subnet_drawn_from_the_tempered_distribution_with_soft_gradients(tiny_hf, tiny_base):
    net = Supernet(tiny_hf, _space(tiny_base))
    with torch.no_grad():
        net.alpha["mlp"][0] = torch.tensor([0.0, 1.0, 2.0])
    net.alive("mlp")[1, 2] = False  # a pruned candidate is never drawn
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = [net.sample(0.5, gen) for _ in range(800)]
    for name in ("hidden", "keep", "mlp", "prec", "lm_head"):
        v = getattr(draws[0], name).detach()
        assert torch.equal(v.sum(-1), torch.ones(v.shape[:-1])) and set(v.unique().tolist()) <= {0.0, 1.0}, name
    freq = torch.stack([d.mlp[0].detach() for d in draws]).mean(0)
    torch.testing.assert_close(freq, net.probs(0.5).mlp[0].detach(), atol=0.05, rtol=0)  # softmax(alpha / tau)
    assert all(float(d.mlp[1, 2]) == 0 for d in draws)
    # straight-through: the logits get the relaxed sample's gradient
    d = net.sample(0.5, gen)
    (d.mlp[0] * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert net.alpha["mlp"].grad[0].abs().sum() > 0


def test_keep_logits_start_confident_and_ordered_by_block_influence(tiny_hf, tiny_base, ids):
    imp = measure_importance(tiny_hf, [ids])
    net = Supernet(tiny_hf, _space(tiny_base), imp)
    net.init_keep_logits(1.5)
    p = net.probs().keep[:, 1].detach()
    b = torch.as_tensor(imp.blocks, dtype=torch.float32)
    more = b[:, None] > b[None, :]
    assert bool((p[:, None] >= p[None, :])[more].all()) and p.max() > p.min()  # more influence, surer keep
    assert bool(((p > 0.5) & (p < 0.93)).all())  # confident, never settled by the prior alone
    plain = Supernet(tiny_hf, _space(tiny_base))
    plain.init_keep_logits(1.5)
    torch.testing.assert_close(plain.probs().keep[:, 1].detach(), torch.full((tiny_base.num_layers,), 0.8176),
                               atol=1e-4, rtol=0)


def test_a_fresh_search_extracts_the_pretrained_widths_until_it_learns_otherwise(tiny_hf, tiny_base):
    net = Supernet(tiny_hf, _space(tiny_base))
    assert net.argmax_spec().layers[0].intermediate_size == 64  # zero logits: a tie goes to the first (narrowest)
    net.init_width_logits(2.0)
    spec, widest = net.argmax_spec(), net.space.largest(net.space.formats[0])
    assert spec.hidden_size == widest.hidden_size
    assert [(ls.num_heads, ls.num_kv_heads, ls.intermediate_size) for ls in spec.layers] == \
        [(ls.num_heads, ls.num_kv_heads, ls.intermediate_size) for ls in widest.layers]


def test_sequential_supernet_prices_latency_in_the_formats_it_will_ship(tiny_hf, tiny_base):
    fp32 = _space(tiny_base, ("fp32",))
    ship = {n: "w4g32a8" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    net = Supernet(tiny_hf, fp32, latency_formats={**ship, "lm_head": "w8a8"})
    c = net.choices(net.probs())
    assert all(c["layers"][i][n].values == ("w4g32a8",) for i in range(tiny_base.num_layers) for n in ship)
    assert c["lm_head"].values == ("w8a8",)


def test_num_weights_is_the_expected_params_of_a_one_hot_supernet(tiny_hf, tiny_base):
    from llmshrink.compressor.budget import num_weights

    for seed in range(3):
        net = Supernet(tiny_hf, _space(tiny_base, ("fp32", "w4g32a8")))
        _pin(net, 40 + seed)
        assert num_weights(net.argmax_spec()) == pytest.approx(float(net.expected_params(net.probs())))


def test_a_search_started_from_a_spec_extracts_it_and_samples_near_it(tiny_hf, tiny_base, ids):
    imp = measure_importance(tiny_hf, [ids])
    space = _space(tiny_base, ("fp32", "w4g32a8"))
    start = replace(space.largest("w4g32a8"), hidden_size=32)
    layers = list(start.layers)
    layers[1] = replace(layers[1], keep=False)
    layers[2] = replace(layers[2], intermediate_size=96, precision={**layers[2].precision, "down_proj": "fp32"})
    start = replace(start, layers=tuple(layers))
    net = Supernet(tiny_hf, space, imp)
    net.init_from_spec(start, 3.0)
    got = net.argmax_spec()
    assert got.hidden_size == 32 and got.lm_head == start.lm_head
    assert [(ls.keep, ls.num_heads, ls.num_kv_heads, ls.intermediate_size, ls.precision) for ls in got.layers] == \
        [(ls.keep, ls.num_heads, ls.num_kv_heads, ls.intermediate_size, ls.precision) for ls in start.layers]
    pr = net.probs()
    n_mlp = len(space.mlp)
    assert float(pr.mlp[2].max()) == pytest.approx(math.exp(3) / (math.exp(3) + n_mlp - 1), abs=1e-5)
    assert float(pr.keep[1, 1]) < 0.1 < 0.9 < float(pr.keep[0, 1])  # dropped / kept, shifted by influence only
    # the spec is the most probable draw, not the only one
    g = torch.Generator().manual_seed(0)
    draws = [net.sample(1.0, g) for _ in range(20)]
    assert any(int(d.mlp[2].argmax()) != space.mlp.index(96) for d in draws)


def test_the_search_can_fake_quantize_with_the_runs_quantizer(tiny_hf, tiny_base, ids):
    space = _space(tiny_base, ("w4g32a8", "fp32"))
    calib = torch.randint(3, 300, (8, 16), generator=torch.Generator().manual_seed(4))
    full = space.largest("w4g32a8")
    gptq = materialize(tiny_hf, full, calib=calib, quantizer="gptq")
    net = Supernet(tiny_hf, space)  # identity orders: activation groups run as the export's do
    net.init_from_spec(full, 50.0)  # one-hot in effect
    with torch.no_grad():
        rtn = net(ids, net.probs())
        net.use_quantized({"w4g32a8": gptq})
        got = net(ids, net.probs())
    # the unpruned spec is the GPTQ model itself, not the rounded-to-nearest one
    torch.testing.assert_close(got, gptq(ids)[0], atol=2e-4, rtol=1e-4)
    assert not torch.allclose(got, rtn, atol=1e-3)
    # a pruned subnet takes the GPTQ model's weights, sliced (an estimate: GPTQ on the slice would differ)
    layers = list(full.layers)
    layers[1] = replace(layers[1], intermediate_size=96)
    narrow = replace(full, layers=tuple(layers))
    net.init_from_spec(narrow, 50.0)
    sliced = materialize(tiny_hf, narrow)
    sliced.blocks[1].down_proj.weight.copy_(gptq.blocks[1].down_proj.weight[:, :96])
    for n in ("gate_proj", "up_proj"):
        getattr(sliced.blocks[1], n).weight.copy_(getattr(gptq.blocks[1], n).weight[:96])
    for j in (0, 2, 3):
        for n in LINEARS:
            getattr(sliced.blocks[j], n).weight.copy_(getattr(gptq.blocks[j], n).weight)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(sliced.blocks[1], n).weight.copy_(getattr(gptq.blocks[1], n).weight)
    sliced.lm_head.weight.copy_(gptq.lm_head.weight)
    with torch.no_grad():
        torch.testing.assert_close(net(ids, net.probs()), sliced(ids)[0], atol=2e-4, rtol=1e-4)
