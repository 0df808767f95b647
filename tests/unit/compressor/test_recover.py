from dataclasses import replace

import pytest
import torch

from llmshrink.compressor.materialize import materialize
from llmshrink.compressor.model import QuantLinear
from llmshrink.compressor.recover import QATLinear, RecoveryConfig, recover
from llmshrink.compressor.search import kd_loss
from llmshrink.spec import BaseShape, SubnetSpec


@pytest.fixture(scope="module")
def calib():
    return torch.randint(3, 300, (16, 24), generator=torch.Generator().manual_seed(6))


def _spec(base):
    spec = SubnetSpec.uniform(base, "w4g32a8", lm_head="w8g32")
    layers = list(spec.layers)
    layers[2] = replace(layers[2], keep=False)
    layers[0] = replace(layers[0], intermediate_size=64, num_kv_heads=1, num_heads=2)
    return replace(spec, layers=tuple(layers), hidden_size=32)


@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
def test_without_steps_recovery_returns_the_quantizers_subnet(tiny_hf, tiny_base, calib, quantizer):
    spec = _spec(tiny_base)
    held = calib[-2:]
    res = recover(tiny_hf, spec, calib[:-2], config=RecoveryConfig(steps=0, batch_size=2), held_out=held,
                  quantizer=quantizer)
    ids = calib[:2]
    torch.testing.assert_close(res.model(ids)[0],
                               materialize(tiny_hf, spec, calib=calib[:-2], quantizer=quantizer)(ids)[0])
    assert res.model.spec == spec


def _grids(cm):
    return {n: (m.quantized.scales, m.quantized.zeros) for n, m in cm.named_modules()
            if isinstance(m, QuantLinear) and m.quantized is not None}


@pytest.mark.parametrize("mode,lr", [("full", 1e-3), ("lora", 3e-3)])
def test_recovery_lowers_held_out_distillation_loss_on_the_quantizers_grid(trained_tiny, mode, lr):
    hf, tok, ids = trained_tiny
    spec = SubnetSpec.uniform(BaseShape.from_config(hf.config), "w2g32a8", lm_head="w8g32")
    calib, held = ids[:96], ids[96:]
    cfg = RecoveryConfig(steps=30, batch_size=4, lr=lr, lora_lr=lr, rank=4, alpha=8, mode=mode, bf16="off")
    res = recover(hf, spec, calib, config=cfg, held_out=held)
    assert res.kd_after < 0.9 * res.kd_before  # on rows training never saw
    assert len(res.history) == 30 and res.tokens == 30 * 4 * calib.shape[1]
    # the deployed (quantized) model is better than the unrecovered one, on the teacher's own logits
    with torch.no_grad():
        teacher = hf(input_ids=held).logits
    start = materialize(hf, spec, calib=calib, quantizer="gptq")
    assert kd_loss(res.model(held)[0], teacher).item() < kd_loss(start(held)[0], teacher).item()
    assert not any(isinstance(m, QATLinear) for m in res.model.modules())  # an ordinary CompressedModel
    assert not res.reverted
    # QAT trained on the quantizer's grid, and the shipped codes sit on it: same scales and zero points
    shipped, initial = _grids(res.model), _grids(start)
    assert shipped.keys() == initial.keys()
    for name, (scales, zeros) in initial.items():
        assert torch.equal(shipped[name][0], scales), name
        assert (zeros is None and shipped[name][1] is None) or torch.equal(shipped[name][1], zeros), name
    # and training changed codes, not only norms
    assert any(not torch.equal(a.quantized.codes, b.quantized.codes) for (_, a), (_, b) in zip(
        _quantized(res.model), _quantized(start), strict=True))


def _quantized(cm):
    return [(n, m) for n, m in cm.named_modules() if isinstance(m, QuantLinear) and m.quantized is not None]


def test_training_scales_keeps_the_quantizers_codes_and_lowers_held_out_kd(trained_tiny):
    hf, _, ids = trained_tiny
    spec = SubnetSpec.uniform(BaseShape.from_config(hf.config), "w2g32a8", lm_head="w8g32")
    calib, held = ids[:96], ids[96:]
    cfg = RecoveryConfig(steps=30, batch_size=4, mode="scales", scales_lr=1e-2, bf16="off", train_head=True)
    res = recover(hf, spec, calib, config=cfg, held_out=held)
    assert res.kd_after < 0.9 * res.kd_before and not res.reverted
    start = materialize(hf, spec, calib=calib, quantizer="gptq")
    shipped, initial = dict(_quantized(res.model)), dict(_quantized(start))
    assert shipped.keys() == initial.keys()
    moved = 0
    for name, q0 in initial.items():
        q1 = shipped[name].quantized
        assert torch.equal(q1.codes, q0.quantized.codes), name  # codes are GPTQ's
        moved += not torch.equal(q1.scales, q0.quantized.scales)
    assert moved == len(initial)  # every layer's scales trained, the lm_head's too (its table is its own)
    # by default the lm_head's stay
    res = recover(hf, spec, calib, config=replace(cfg, steps=2, train_head=False), held_out=held)
    assert torch.equal(res.model.lm_head.quantized.scales, initial["lm_head"].quantized.scales)


def test_a_head_sharing_the_embeddings_table_keeps_its_scales(trained_tiny):
    # tied, in the embedding's own format: the export stores one table for both, so the head's grid must not move
    hf, _, ids = trained_tiny
    base = BaseShape.from_config(hf.config)
    assert base.tied_embeddings
    spec = replace(SubnetSpec.uniform(base, "w2g32a8", lm_head="w8g32"), embedding="w8g32")
    cfg = RecoveryConfig(steps=10, batch_size=4, mode="scales", scales_lr=1e-2, bf16="off", train_head=True)
    res = recover(hf, spec, ids[:96], config=cfg, held_out=ids[96:])
    assert not res.reverted
    start = materialize(hf, spec, calib=ids[:96], quantizer="gptq")
    assert torch.equal(res.model.lm_head.quantized.scales, start.lm_head.quantized.scales)
    assert not torch.equal(res.model.blocks[0].q_proj.quantized.scales, start.blocks[0].q_proj.quantized.scales)


@pytest.mark.parametrize("mode", ["lora", "scales"])
def test_training_forward_is_the_shipped_model(tiny_hf, tiny_base, calib, mode):
    # the student's forward (weights rounded on the grid) is exactly the exported codes' model
    from llmshrink.compressor.recover import _shipped, _student

    spec = SubnetSpec.uniform(tiny_base, "w4g32")
    cm = materialize(tiny_hf, spec, calib=calib, quantizer="gptq")
    student = _student(cm, RecoveryConfig(mode=mode))
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-2)
        trained = student(calib[:2])[0]
        shipped = _shipped(student, cm.lm_head)(calib[:2])[0]
    torch.testing.assert_close(trained, shipped, rtol=1e-5, atol=1e-5)


def test_a_static_int8_lm_head_recovers_and_is_calibrated_after(tiny_hf, tiny_base, calib):
    # a w8a8s lm_head (an a100 search can pick it) trains quantization-aware and gets its activation scale
    # from calibration text only once recovery is done
    spec = replace(_spec(tiny_base), lm_head="w8a8s")
    res = recover(tiny_hf, spec, calib, config=RecoveryConfig(steps=2, batch_size=2))
    assert res.model.spec.lm_head == "w8a8s" and float(res.model.lm_head.act_scale) > 0


def test_recovery_that_hurts_held_out_rows_ships_the_quantizers_model(trained_tiny):
    # a learning rate far too large wrecks the student; the held-out check must catch it
    hf, _, ids = trained_tiny
    spec = SubnetSpec.uniform(BaseShape.from_config(hf.config), "w4g32a8")
    res = recover(hf, spec, ids[:96], held_out=ids[96:],
                  config=RecoveryConfig(steps=5, batch_size=4, mode="full", lr=1.0, bf16="off"))
    assert res.reverted and res.kd_after == res.kd_before
    start = materialize(hf, spec, calib=ids[:96], quantizer="gptq")
    torch.testing.assert_close(res.model(ids[96:100])[0], start(ids[96:100])[0])


def test_recovery_starts_from_a_given_materialization_and_refuses_another_specs(tiny_hf, tiny_base, calib,
                                                                                monkeypatch):
    import llmshrink.compressor.recover as R

    spec = _spec(tiny_base)
    start = materialize(tiny_hf, spec, calib=calib[:8], quantizer="gptq")  # other rows than recovery would use
    monkeypatch.setattr(R, "materialize", lambda *a, **k: pytest.fail("a given start must not be quantized again"))
    res = recover(tiny_hf, spec, calib[:-2], config=RecoveryConfig(steps=0), held_out=calib[-2:], start=start)
    assert res.model is start
    with pytest.raises(ValueError, match="another spec"):
        recover(tiny_hf, SubnetSpec.uniform(tiny_base, "w4g32a8"), calib, config=RecoveryConfig(steps=0), start=start)


def test_training_rows_come_in_whole_epochs():
    from llmshrink.compressor.recover import _epochs

    order = _epochs(10, 25, seed=3).tolist()
    assert len(order) == 25 and sorted(order[:10]) == list(range(10)) == sorted(order[10:20])
    assert set(order[20:]) <= set(range(10)) and len(set(order[20:])) == 5  # a partial epoch repeats no row
    assert order[:10] != order[10:20] and order == _epochs(10, 25, seed=3).tolist()


def test_the_early_stop_ships_the_best_state_a_check_saw():
    from llmshrink.compressor.recover import _EarlyStop

    p = torch.nn.Parameter(torch.zeros(3))
    stop = _EarlyStop(RecoveryConfig(steps=30, check_every=5, min_gain=0.01), [p], kd_before=1.0)
    assert [s for s in range(1, 31) if stop.due(s)] == [5, 10, 15, 20, 25]  # none at the end: the final KD is
    with torch.no_grad():
        p.fill_(1.0)
    assert not stop.check(5, 0.5)  # gained 50 %: go on
    with torch.no_grad():
        p.fill_(2.0)
    assert stop.check(10, 0.7) and stop.stopped_at == 10  # worse: stop, and the state of step 5 ships
    assert stop.restore_best() == 0.5 and torch.equal(p.detach(), torch.ones(3))
    assert stop.checks == [(5, 0.5), (10, 0.7)]
    slow = _EarlyStop(RecoveryConfig(steps=30, check_every=5, min_gain=0.01), [p], kd_before=1.0)
    assert not slow.check(5, 0.98) and slow.check(10, 0.975)  # 2 %, then 0.5 %: too little


def test_recovery_stops_early_when_held_out_kd_stops_improving(trained_tiny):
    hf, _, ids = trained_tiny
    spec = SubnetSpec.uniform(BaseShape.from_config(hf.config), "w2g32a8", lm_head="w8g32")
    calib, held = ids[:96], ids[96:]
    cfg = RecoveryConfig(steps=20, batch_size=4, mode="scales", scales_lr=1e-2, bf16="off", check_every=5)
    never = recover(hf, spec, calib, config=replace(cfg, min_gain=-1.0), held_out=held)
    assert never.stopped_at is None and len(never.history) == 20 and [s for s, _ in never.checks] == [5, 10, 15]
    first = recover(hf, spec, calib, config=replace(cfg, min_gain=1.0), held_out=held)  # no check gains 100 %
    assert first.stopped_at == 5 and len(first.history) == 5 and first.tokens == 5 * 4 * calib.shape[1]
    assert first.checks == never.checks[:1] and first.kd_after == pytest.approx(min(first.kd_before,
                                                                                     first.checks[0][1]))
