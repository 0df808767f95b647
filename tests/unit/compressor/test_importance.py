import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from llmshrink.compressor.importance import measure_importance
from llmshrink.compressor.materialize import materialize
from llmshrink.spec import SubnetSpec


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (2, 24), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def broken(tiny_hf):
    """The tiny model with one thing of each kind switched off, so its importance must be zero."""
    m = copy.deepcopy(tiny_hf)
    cfg = m.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        L0, L2 = m.model.layers[0], m.model.layers[2]
        L0.mlp.gate_proj.weight[5] = 0  # neuron 5 of layer 0: act(0) * up = 0
        L0.self_attn.v_proj.weight[hd:2 * hd] = 0  # kv group 1 of layer 0: its heads output zeros
        for layer in m.model.layers:  # hidden channel 7: every norm outputs 0 there
            layer.input_layernorm.weight[7] = 0
            layer.post_attention_layernorm.weight[7] = 0
        m.model.norm.weight[7] = 0
        L2.self_attn.o_proj.weight.zero_()  # block 2 adds nothing to the residual stream
        L2.mlp.down_proj.weight.zero_()
    return m


def test_what_is_switched_off_ranks_last(broken, tiny_base):
    imp = measure_importance(broken, _batches())
    assert imp.tokens == 3 * 2 * 24
    b = tiny_base
    per = b.heads_per_group
    assert imp.mlp[0, 5] == 0 and imp.layer_order(0).mlp[-1] == 5
    assert np.all(imp.heads[0, per:2 * per] == 0) and imp.layer_order(0).kv_groups[-1] == 1
    assert imp.hidden[7] == 0 and imp.hidden_order()[-1] == 7
    assert imp.blocks[2] == pytest.approx(0, abs=1e-6) and imp.block_order()[-1] == 2
    assert np.all(imp.blocks[[0, 1, 3]] > 1e-3)
    for i in range(b.num_layers):  # every order is a permutation
        o = imp.layer_order(i)
        assert sorted(o.mlp) == list(range(b.intermediate_size))
        assert sorted(o.kv_groups) == list(range(b.num_kv_heads))
        assert sorted(o.rope_pairs) == list(range(b.head_dim // 2))


def test_applied_orders_prune_the_unimportant_parts_first(broken, tiny_base, tiny_hf):
    imp = measure_importance(broken, _batches())
    b = tiny_base
    spec = SubnetSpec.original(b)
    layers = list(spec.layers)
    layers[3] = replace(layers[3], keep=False)  # three blocks kept: importance moves the drop onto block 2
    layers[0] = replace(layers[0], intermediate_size=b.intermediate_size - 1,
                        num_kv_heads=b.num_kv_heads - 1, num_heads=b.num_heads - b.heads_per_group)
    spec = imp.apply(replace(spec, layers=tuple(layers), hidden_size=b.hidden_size - 32))
    assert [ls.keep for ls in spec.layers] == [True, True, False, True]
    assert 7 not in spec.hidden_channels()
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    # removing only switched-off parts (block 2, neuron 5, group 1) changes nothing but the pruned
    # hidden channels; compare with the same hidden pruning alone
    full = imp.apply(replace(SubnetSpec.original(b), hidden_size=b.hidden_size - 32), choose_blocks=False)
    a = materialize(broken, spec)(ids)[0]
    ref = materialize(broken, full)(ids)[0]
    torch.testing.assert_close(a, ref, atol=1e-4, rtol=1e-4)


def test_preference_charges_each_cut_its_share_of_the_importance(broken, tiny_base):
    imp = measure_importance(broken, _batches())
    full = SubnetSpec.uniform(tiny_base, "fp32")
    assert imp.preference(full) == 0.0

    def drop(i):
        layers = list(full.layers)
        layers[i] = replace(layers[i], keep=False)
        return replace(full, layers=tuple(layers))

    # block 2 adds nothing (zero influence): dropping it costs nothing; any other block costs its share
    assert imp.preference(drop(2)) == pytest.approx(0.0, abs=1e-9)
    costs = [-imp.preference(drop(i)) for i in range(tiny_base.num_layers)]
    share = np.maximum(imp.blocks, 0) / np.maximum(imp.blocks, 0).sum()  # a float -1e-9 influence counts as 0
    assert costs == pytest.approx(list(share), abs=1e-9)
    # narrowing a kept block's MLP loses half its share times the neurons' energy left out (neuron 5 of layer 0
    # is dead, so keeping all but one loses nothing there); the hidden width charges every block
    layers = list(full.layers)
    layers[0] = replace(layers[0], intermediate_size=tiny_base.intermediate_size - 1)
    assert imp.preference(replace(full, layers=tuple(layers))) == pytest.approx(0.0, abs=1e-9)
    layers[1] = replace(layers[1], intermediate_size=tiny_base.intermediate_size // 2)
    half = -imp.preference(replace(full, layers=tuple(layers)))
    sq = np.sort(imp.mlp[1] ** 2)[::-1]
    assert half == pytest.approx(share[1] * 0.5 * (1 - sq[:tiny_base.intermediate_size // 2].sum() / sq.sum()))
    narrow = replace(full, hidden_size=tiny_base.hidden_size - 1)
    assert imp.preference(narrow) == pytest.approx(0.0, abs=1e-9)  # channel 7 is dead: the narrowest cut is free
    assert imp.preference(replace(full, hidden_size=tiny_base.hidden_size // 2)) < 0


def test_a_blocks_drop_cost_is_the_kl_of_the_model_without_it(tiny_hf):
    """block_drop_kl replays recorded outputs instead of recomputing the blocks before the dropped one: each cost
    must equal the KL of a copy of the model whose layer list leaves that block out."""
    from llmshrink.compressor.importance import block_drop_kl
    from llmshrink.compressor.search import kd_loss

    batches = _batches(2)
    costs = block_drop_kl(tiny_hf, batches)
    vocab = tiny_hf.config.vocab_size
    with torch.no_grad():
        for i in range(len(tiny_hf.model.layers)):
            m = copy.deepcopy(tiny_hf)
            del m.model.layers[i]
            want = sum(float(kd_loss(m(input_ids=ids, use_cache=False).logits[..., :vocab],
                                     torch.log_softmax(tiny_hf(input_ids=ids, use_cache=False).logits[..., :vocab], -1)))
                       * ids.numel() for ids in batches) / sum(ids.numel() for ids in batches)
            assert costs[i] == pytest.approx(want, rel=1e-4, abs=1e-7), i
            assert costs[i] > 0
    assert not any(hasattr(layer, "forward") and "forward" in vars(layer) for layer in tiny_hf.model.layers)


def _assert_same_importance(got, want):
    for name in ("heads", "v_dims", "rope_pairs", "mlp", "blocks"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    # the hidden-channel sums of squares are added layer by layer instead of batch by batch
    np.testing.assert_allclose(got.hidden, want.hidden, rtol=1e-12)
    assert got.tokens == want.tokens


@pytest.mark.parametrize("drop_batches", [1, 2])
def test_streamed_importance_gives_the_whole_models_scores_without_loading_it(broken, tmp_path, monkeypatch,
                                                                              drop_batches):
    """Layer by layer from safetensors, with block-drop branches carried along: every score the whole path's
    (the broken model, so its zeros and its dead block are in there), and the whole model is never loaded."""
    from llmshrink.compressor.importance import measure_importance_streamed
    from llmshrink.models.lazy import LazyModel

    broken.save_pretrained(tmp_path)
    batches = _batches(3)
    want = measure_importance(broken, batches, drop_batches=drop_batches)
    lazy = LazyModel(str(tmp_path))
    loaded = []
    real = lazy.layer
    monkeypatch.setattr(lazy, "layer", lambda i: loaded.append(i) or real(i))
    got = measure_importance_streamed(lazy, batches, drop_batches=drop_batches)
    _assert_same_importance(got, want)
    assert loaded == list(range(broken.config.num_hidden_layers))  # each layer read once
    assert got.blocks[2] < 1e-6 < got.blocks.min(initial=np.inf, where=np.arange(len(got.blocks)) != 2)
    assert all(p.is_meta for p in lazy.model.parameters())  # everything it read is released
    assert not any("forward" in vars(layer) for layer in lazy.model.model.layers)


def test_streamed_importance_reads_an_untied_lm_head_and_biases(tmp_path):
    from llmshrink.compressor.importance import measure_importance_streamed
    from llmshrink.models.lazy import LazyModel
    from llmshrink.testing import tiny_llama, tiny_llama_config

    hf = tiny_llama(tiny_llama_config(tie_word_embeddings=False, attention_bias=True), seed=4)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    hf.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, hf.config.vocab_size, (2, 24), generator=g) for _ in range(2)]
    _assert_same_importance(measure_importance_streamed(LazyModel(str(tmp_path)), batches),
                            measure_importance(hf, batches))
