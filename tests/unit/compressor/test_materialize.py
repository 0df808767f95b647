import copy
from dataclasses import replace

import pytest
import torch

from llmshrink.compressor.materialize import materialize
from llmshrink.compressor.model import CompressedModel
from llmshrink.spec import LayerOrder, SpecError, SubnetSpec, random_spec


@pytest.fixture
def ids():
    return torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def test_original_spec_reproduces_hf_logits(tiny_hf, tiny_base, ids):
    cm = materialize(tiny_hf, SubnetSpec.original(tiny_base))
    assert torch.allclose(cm(ids)[0], tiny_hf(ids).logits, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_kv_cache_decode_matches_full_forward(tiny_hf, tiny_base, ids, seed):
    cm = materialize(tiny_hf, random_spec(tiny_base, seed, formats=("fp32",)))
    full, _ = cm(ids)
    a, past = cm(ids[:, :7])
    outs = [a]
    for t in range(7, 12):
        o, past = cm(ids[:, t:t + 1], past)
        outs.append(o)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-4)


def _with_layer(spec, i, **kw):
    layers = list(spec.layers)
    layers[i] = replace(layers[i], **kw)
    return replace(spec, layers=tuple(layers))


def test_dropping_mlp_neurons_equals_zeroing_them(tiny_hf, tiny_base, ids):
    order = LayerOrder.identity(tiny_base)
    keep = [5, 1, 90, 64] + [n for n in range(tiny_base.intermediate_size) if n not in (5, 1, 90, 64)]
    spec = _with_layer(SubnetSpec.original(tiny_base), 1, intermediate_size=4, order=replace(order, mlp=tuple(keep)))
    ref = copy.deepcopy(tiny_hf)
    dropped = [n for n in range(tiny_base.intermediate_size) if n not in (5, 1, 90, 64)]
    with torch.no_grad():
        ref.model.layers[1].mlp.down_proj.weight[:, dropped] = 0
    assert torch.allclose(materialize(tiny_hf, spec)(ids)[0], ref(ids).logits, atol=1e-5)


def test_dropping_heads_and_groups_equals_zeroing_their_output(tiny_hf, tiny_base, ids):
    # Keep kv group 1 only, and in it the second query head.
    order = replace(LayerOrder.identity(tiny_base), kv_groups=(1, 0), heads_in_group=((0, 1), (1, 0)))
    spec = _with_layer(SubnetSpec.original(tiny_base), 2, num_kv_heads=1, num_heads=1, order=order)
    kept_head = 1 * tiny_base.heads_per_group + 1
    ref = copy.deepcopy(tiny_hf)
    hd = tiny_base.head_dim
    with torch.no_grad():
        o = ref.model.layers[2].self_attn.o_proj.weight
        for h in range(tiny_base.num_heads):
            if h != kept_head:
                o[:, h * hd:(h + 1) * hd] = 0
    assert torch.allclose(materialize(tiny_hf, spec)(ids)[0], ref(ids).logits, atol=1e-5)


def test_dropping_a_layer_equals_removing_it(tiny_hf, tiny_base, ids):
    spec = _with_layer(SubnetSpec.original(tiny_base), 0, keep=False)
    ref = copy.deepcopy(tiny_hf)
    ref.model.layers = ref.model.layers[1:]
    for j, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = j
    ref.config.num_hidden_layers -= 1
    assert torch.allclose(materialize(tiny_hf, spec)(ids)[0], ref(ids).logits, atol=1e-5)


def test_quantized_model_is_close_and_saves_exactly(tiny_hf, tiny_base, ids, tmp_path):
    spec = SubnetSpec.original(tiny_base).with_precision("w8g32")
    cm = materialize(tiny_hf, spec)
    ref = tiny_hf(ids).logits
    out = cm(ids)[0]
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert not torch.equal(out, ref)
    cm.save(tmp_path)
    back = CompressedModel.load(tmp_path)
    assert back.spec == spec and torch.equal(back(ids)[0], out)


def test_a_saved_model_read_a_linear_at_a_time_gives_what_loading_it_whole_gives(tiny_hf, tiny_base, tmp_path):
    from llmshrink.compressor.model import SavedModel

    # a pruned spec in two formats, so block j is not layer j and formats differ per linear
    spec = SubnetSpec.original(tiny_base).with_precision("w8g32").with_precision("fp32", ["up_proj"], lm_head=False)
    spec = replace(spec, lm_head="w4g32", layers=(replace(spec.layers[0], keep=False), *spec.layers[1:]))
    cm = materialize(tiny_hf, spec)
    saved = SavedModel(cm.save(tmp_path))
    assert saved.spec == spec
    for name in ("blocks.0.q_proj", "blocks.1.up_proj", "blocks.1.down_proj", "lm_head"):
        a, b = saved.linear(name), cm.linear(name)
        assert a.fmt == b.fmt and torch.equal(a.weight, b.weight), name
        assert (a.quantized is None) == (b.quantized is None) and (a.quantized is None
                                                                     or torch.equal(a.quantized.codes, b.quantized.codes))
    assert saved.linear("blocks.1.up_proj").quantized is None and saved.linear("lm_head").fmt.weight_bits == 4


def test_spec_for_another_model_is_refused(tiny_hf, tiny_base):
    other = replace(tiny_base, hidden_size=tiny_base.hidden_size * 2)
    with pytest.raises(SpecError) as ei:
        materialize(tiny_hf, SubnetSpec.original(other))
    assert ei.value.rule == "base-matches-model"


def test_greedy_generate_is_deterministic_and_stops(tiny_hf, tiny_base):
    cm = materialize(tiny_hf, SubnetSpec.original(tiny_base))
    prompt = torch.tensor([[5, 6, 7]])
    a = cm.generate(prompt, 8)
    b = cm.generate(prompt, 8)
    assert torch.equal(a, b) and a.shape[1] <= 8
    full = tiny_hf.generate(prompt, max_new_tokens=a.shape[1], do_sample=False, eos_token_id=None)
    assert torch.equal(full[0, 3:], a[0])


def test_num_params_counts_a_tied_lm_head_once_unless_its_format_differs(tiny_hf, tiny_base):
    assert tiny_base.tied_embeddings
    hf_params = sum(p.numel() for p in tiny_hf.parameters())  # tied: one tensor
    assert materialize(tiny_hf, SubnetSpec.original(tiny_base)).num_params == hf_params
    head = tiny_base.vocab_size * tiny_base.hidden_size
    int4_head = SubnetSpec.uniform(tiny_base, "fp32", lm_head="w4g32")
    assert materialize(tiny_hf, int4_head).num_params == hf_params + head


def test_keep_computes_logits_for_the_last_positions_only(tiny_hf, tiny_base, ids):
    cm = materialize(tiny_hf, SubnetSpec.original(tiny_base))
    full, _ = cm(ids)
    last, _ = cm(ids, keep=3)
    assert last.shape[1] == 3
    torch.testing.assert_close(last, full[:, -3:])


def test_static_activation_scales_are_calibrated_max_and_saved(tiny_hf, tiny_base, ids, tmp_path):
    from llmshrink.compressor.model import rms_norm
    from llmshrink.errors import UsageError

    spec = SubnetSpec.uniform(tiny_base, "w8a8s", lm_head="fp32")
    with pytest.raises(UsageError, match="calibrated on text"):
        materialize(tiny_hf, spec)
    calib = torch.randint(3, 300, (6, 24), generator=torch.Generator().manual_seed(1))
    cm = materialize(tiny_hf, spec, calib=calib)
    b0 = cm.blocks[0]
    # q_proj of the first block reads the normed embeddings: its scale is their max / 127, in fp16.
    h = rms_norm(torch.nn.functional.embedding(calib, cm.embed), b0.input_norm, cm.meta.rms_norm_eps)
    expect = float(torch.tensor(float(h.abs().max()) / 127).half().float())
    assert float(b0.q_proj.act_scale) == pytest.approx(expect, rel=1e-6)
    assert all(getattr(b, n).act_scale is not None for b in cm.blocks for n in ("q_proj", "o_proj", "down_proj"))
    assert cm.lm_head.act_scale is None  # fp32: nothing to calibrate
    y = cm(ids)[0]
    loaded = CompressedModel.load(cm.save(tmp_path / "m"))
    assert torch.equal(loaded(ids)[0], y)
    # A layer whose scale is missing refuses to run rather than run unquantized.
    loaded.blocks[0].q_proj.act_scale = None
    with pytest.raises(RuntimeError, match="calibrated activation scale"):
        loaded(ids)
