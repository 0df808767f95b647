"""Device placement of the torch phases of ``compress`` (``--device cuda`` on a GPU), checked on this CPU.

No GPU here, so the check is the converse one: the model stays on the CPU while torch's *default* device is
``meta`` (``with torch.device("meta")``). A tensor a phase makes without saying where (``torch.zeros(n)``) then
lands on ``meta`` and the first op that meets the model's CPU tensors fails: exactly the tensors that would be
left on the CPU beside a model on a GPU. Each phase must give, bit for bit, what it gives with the default device
left alone. Tests marked ``gpu`` run the real thing where CUDA is present.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from llmshrink.compressor.contenders import screen_kd
from llmshrink.compressor.importance import measure_importance
from llmshrink.compressor.materialize import materialize
from llmshrink.compressor.recover import RecoveryConfig, recover
from llmshrink.compressor.search import SearchConfig, run_search
from llmshrink.compressor.sensitivity import measure_sensitivity
from llmshrink.compressor.space import SearchSpace
from llmshrink.compressor.supernet import Supernet
from llmshrink.compressor.teacher import TeacherTargets
from llmshrink.device import Device, place_model
from llmshrink.spec import SubnetSpec
from llmshrink.targets.workload import Workload


@pytest.fixture(scope="module")
def calib():
    return torch.randint(3, 300, (16, 24), generator=torch.Generator().manual_seed(9))


def twice(phase):
    """``phase()`` with the default device left alone, then with it set to ``meta``: both results."""
    plain = phase()
    with torch.device("meta"):
        elsewhere = phase()
    return plain, elsewhere


def _space(base):
    return SearchSpace(base, hidden=(32, 64), kv_groups=(1, 2), heads_per_group=(2,), head_dim=(16,),
                       mlp=(64, 96, 128), min_layers=2, formats=("fp32", "w4g32a8"),
                       lm_head_formats=("fp32", "w4g32a8")).validate()


def _subnet(base):
    spec = SubnetSpec.uniform(base, "w4g32a8", lm_head="w8g32")
    layers = list(spec.layers)
    layers[1] = replace(layers[1], keep=False)
    layers[0] = replace(layers[0], intermediate_size=64, num_kv_heads=1, num_heads=2)
    return replace(spec, layers=tuple(layers), hidden_size=32)


def test_the_check_catches_a_tensor_made_without_a_device():
    # the premise: what the check flags is what a GPU run would trip over
    x = torch.ones(3)
    with torch.device("meta"), pytest.raises(RuntimeError, match="device"):
        x + torch.zeros(3)  # noqa: B018


def test_importance_and_teacher_targets(tiny_hf, tiny_llama_dir, calib):
    batches = [calib[i:i + 4] for i in range(0, 8, 4)]
    a, b = twice(lambda: measure_importance(tiny_hf, batches))
    for k in ("heads", "v_dims", "rope_pairs", "mlp", "hidden", "blocks"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    from llmshrink.compressor.importance import measure_importance_streamed
    from llmshrink.models.lazy import LazyModel

    lazy = LazyModel(str(tiny_llama_dir))  # the layer-streamed path, weights read from disk as it goes
    c, d = twice(lambda: measure_importance_streamed(lazy, batches))
    for k in ("heads", "v_dims", "rope_pairs", "mlp", "hidden", "blocks"):
        np.testing.assert_array_equal(getattr(c, k), getattr(d, k))
    t, u = twice(lambda: TeacherTargets(tiny_hf, calib[:6], batch_size=4))
    assert t.logp.device.type == u.logp.device.type == "cpu"  # host-side whatever the teacher's device
    torch.testing.assert_close(t.logp, u.logp, rtol=0, atol=0)


def test_search_with_the_runs_quantizer(tiny_hf, tiny_base, steady_table, calib):
    table, _ = steady_table
    imp = measure_importance(tiny_hf, [calib[:8]])
    space = _space(tiny_base)
    quantized = {"w4g32a8": materialize(tiny_hf, space.largest("w4g32a8"), calib=calib[:8], quantizer="gptq")}
    cfg = SearchConfig(steps=4, batch_size=2, seq_len=24, samples=2, settle_after=2, settle_every=2,
                       checkpoint_every=2, requant_every=2)
    start = SubnetSpec.uniform(tiny_base, "w4g32a8")

    def search():
        net = Supernet(tiny_hf, space, imp)
        net.use_quantized(quantized)
        res = run_search(net, tiny_hf, calib, table=table, workload=Workload("decode", 1, 16), budget_ms=0.05,
                         config=cfg, start_from=start)
        return {k: v.detach().clone() for k, v in net.alpha.items()}, [h.kd for h in res.history]

    (alpha, kd), (alpha2, kd2) = twice(search)
    assert kd == kd2
    for k in alpha:
        torch.testing.assert_close(alpha[k], alpha2[k], rtol=0, atol=0)


def test_gptq_screening_and_sensitivity(tiny_hf, tiny_base, calib):
    spec = _subnet(tiny_base)
    a, b = twice(lambda: materialize(tiny_hf, spec, calib=calib[:8], quantizer="gptq").state())
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    cm = materialize(tiny_hf, spec, calib=calib[:8], quantizer="gptq")
    kl, kl2 = twice(lambda: screen_kd(cm, tiny_hf, calib[8:12], batch_size=2))
    assert kl == kl2 and kl > 0
    s, s2 = twice(lambda: measure_sensitivity(tiny_hf, spec, ("fp32", "w4g32a8"), ("fp32", "w8g32"),
                                              [calib[:4]]).scores)
    assert s == s2


@pytest.mark.parametrize("mode", ["scales", "lora"])
def test_recovery(tiny_hf, tiny_base, calib, mode):
    spec = _subnet(tiny_base)
    cfg = RecoveryConfig(steps=2, batch_size=2, seq_len=24, mode=mode)

    def run():
        torch.manual_seed(0)  # LoRA's initialization draws from the global generator
        res = recover(tiny_hf, spec, calib[:12], config=cfg, held_out=calib[12:], quant_calib=calib[:8])
        return res.kd_before, res.kd_after, res.model.state()

    (b, a, state), (b2, a2, state2) = twice(run)
    assert (b, a) == (b2, a2)
    for k in state:
        torch.testing.assert_close(state[k], state2[k], rtol=0, atol=0)


def test_moving_a_compressed_model_moves_its_codes_and_keeps_their_dtypes(tiny_hf, tiny_base, calib):
    cm = materialize(tiny_hf, _subnet(tiny_base), calib=calib[:8], quantizer="gptq")
    lin = cm.blocks[0].q_proj
    scales_dtype = lin.quantized.scales.dtype
    cm.half()  # a dtype cast leaves the grid alone: the codes' scales are what ships
    assert lin.quantized.scales.dtype == scales_dtype
    cm.to("meta")  # a device move takes the codes along (they are no buffers)
    assert {lin.quantized.codes.device.type, lin.quantized.scales.device.type, lin.weight.device.type} == {"meta"}


def test_place_model_rounds_parameters_but_not_the_rotary_frequencies(tiny_hf):
    import copy

    m = place_model(copy.deepcopy(tiny_hf), Device("cpu", "test", 1, 1, "bf16"))
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.model.rotary_emb.inv_freq.dtype == torch.float32  # rounded to bf16, angles drift by radians


@pytest.mark.gpu
def test_compress_on_cuda_chooses_what_the_cpu_chooses(tiny_llama_dir, tiny_table, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from llmshrink.compressor.compress import compress

    _, yaml_path = tiny_table
    kw = dict(target=str(yaml_path), latency_ms="1.0xint4", steps=4, recovery_steps=2, calib_data="self",
              adapt_table=False)
    cpu = compress(str(tiny_llama_dir), out=tmp_path / "cpu", device="cpu", **kw)
    gpu = compress(str(tiny_llama_dir), out=tmp_path / "gpu", device="cuda", **kw)
    assert [c.spec_fingerprint for c in gpu.record.candidates] == [c.spec_fingerprint for c in cpu.record.candidates]
    assert gpu.record.config.device.startswith("cuda")
