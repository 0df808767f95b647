import time

import pytest
import torch

from llmshrink.errors import RemoteUnavailableError, UnsupportedModelError
from llmshrink.models import count_params, load_config, load_model, load_tokenizer, model_info
from llmshrink.testing import tiny_llama, tiny_llama_config


def test_load_tiny_llama_from_directory(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir))
    tok = load_tokenizer(str(tiny_llama_dir))
    assert not model.training and next(model.parameters()).dtype == torch.float32
    ids = tok("the capital of france", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False).endswith("<|im_start|>assistant\n")


def test_info_matches_config_and_real_parameter_count(tiny_llama_dir):
    config = load_config(str(tiny_llama_dir))
    info = model_info(config, "local_dir:x")
    model = load_model(str(tiny_llama_dir))
    assert info.num_params == sum(p.numel() for p in model.parameters())
    assert (info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads) == (4, 64, 4, 2)
    assert info.head_dim == 16 and info.tied_embeddings and info.architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("overrides", [
    {"tie_word_embeddings": False},
    {"attention_bias": True, "mlp_bias": True},
    {"head_dim": 24},
])
def test_count_params_llama_variants(overrides):
    config = tiny_llama_config(**overrides)
    model = tiny_llama(config)
    assert count_params(config) == sum(p.numel() for p in model.parameters())


def test_count_params_qwen2_has_qkv_bias():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    assert count_params(config) == sum(p.numel() for p in model.parameters())


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as ei:
        load_model(str(tmp_path))
    assert "gpt2" in ei.value.message and "llama" in ei.value.hint
    assert ei.value.exit_code == 2


def test_hub_id_offline_fails_fast_with_options(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(RemoteUnavailableError) as ei:
        load_config("someone/not-cached-model")
    assert time.perf_counter() - start < 10  # no 25 s of hub retries
    assert ei.value.exit_code == 6
    assert "smollm2-135m" in ei.value.hint and ".gguf" in ei.value.hint


def test_lazy_model_needs_safetensors_and_reads_what_load_model_reads(tiny_llama_dir, tiny_hf):
    from pathlib import Path

    import torch

    from llmshrink.errors import UsageError
    from llmshrink.models.lazy import LazyModel

    configs_only = Path(__file__).parents[2] / "data" / "configs" / "llama-3.2-1b"
    with pytest.raises(UsageError, match="no safetensors"):
        LazyModel(str(configs_only))
    lazy = LazyModel(str(tiny_llama_dir))
    assert all(p.device.type == "meta" for p in lazy.model.parameters())  # nothing loaded up front
    layer = lazy.layer(1)
    for name, p in tiny_hf.model.layers[1].named_parameters():
        assert torch.equal(dict(layer.named_parameters())[name], p), name
    lazy.release(layer)
    assert all(p.device.type == "meta" for p in layer.parameters())
    assert torch.equal(lazy.model.model.rotary_emb.inv_freq, tiny_hf.model.rotary_emb.inv_freq)
