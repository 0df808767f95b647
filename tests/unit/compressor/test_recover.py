from dataclasses import replace

import pytest
import torch

from llmshrink.compressor.materialize import materialize
from llmshrink.compressor.recover import QATLinear, RecoveryConfig, recover
from llmshrink.compressor.search import kd_loss
from llmshrink.spec import SubnetSpec


@pytest.fixture(scope="module")
def calib():
    return torch.randint(3, 300, (16, 24), generator=torch.Generator().manual_seed(6))


def _spec(base):
    spec = SubnetSpec.uniform(base, "w4g32a8", lm_head="w8g32")
    layers = list(spec.layers)
    layers[2] = replace(layers[2], keep=False)
    layers[0] = replace(layers[0], intermediate_size=64, num_kv_heads=1, num_heads=2)
    return replace(spec, layers=tuple(layers), hidden_size=32)


def test_without_steps_recovery_returns_the_plain_materialized_subnet(tiny_hf, tiny_base, calib):
    spec = _spec(tiny_base)
    res = recover(tiny_hf, spec, calib, config=RecoveryConfig(steps=0, batch_size=2))
    ids = calib[:2]
    torch.testing.assert_close(res.model(ids)[0], materialize(tiny_hf, spec)(ids)[0])
    assert res.model.spec == spec


def test_recovery_lowers_the_distillation_loss_of_the_quantized_subnet(tiny_hf, tiny_base, calib):
    spec = _spec(tiny_base)
    res = recover(tiny_hf, spec, calib, config=RecoveryConfig(steps=30, batch_size=4, lr=3e-3, rank=4, alpha=8))
    assert res.kd_after < 0.9 * res.kd_before
    assert len(res.history) == 30
    # the deployed (quantized, merged) model is better than the unrecovered one, on the teacher's own logits
    ids = calib[:4]
    with torch.no_grad():
        teacher = tiny_hf(input_ids=ids).logits
    before = kd_loss(materialize(tiny_hf, spec)(ids)[0], teacher).item()
    after = kd_loss(res.model(ids)[0], teacher).item()
    assert after < before
    assert not any(isinstance(m, QATLinear) for m in res.model.modules())  # an ordinary CompressedModel


def test_a_static_int8_lm_head_recovers_and_is_calibrated_after(tiny_hf, tiny_base, calib):
    # a w8a8s lm_head (an a100 search can pick it) trains quantization-aware and gets its activation scale
    # from calibration text only once recovery is done
    spec = replace(_spec(tiny_base), lm_head="w8a8s")
    res = recover(tiny_hf, spec, calib, config=RecoveryConfig(steps=2, batch_size=2))
    assert res.model.spec.lm_head == "w8a8s" and float(res.model.lm_head.act_scale) > 0
