import json

import pytest
import torch

from llmshrink.errors import UsageError
from llmshrink.models.data import (
    doc_bucket,
    parse_data_spec,
    read_documents,
    self_splits,
    split_documents,
    token_splits,
)
from llmshrink.testing import tiny_corpus


@pytest.fixture
def docs():
    lines = tiny_corpus(600, seed=3)
    return [" ".join(lines[i:i + 3]) for i in range(0, 600, 3)]  # 200 documents


def test_parse_specs(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("a\n\nb")
    assert parse_data_spec("self").kind == "self"
    assert parse_data_spec(str(f)).kind == "file"
    hf = parse_data_spec("wikitext:wikitext-2-raw-v1", split="validation")
    assert (hf.kind, hf.ref, hf.config, hf.split) == ("hf", "wikitext", "wikitext-2-raw-v1", "validation")
    with pytest.raises(UsageError, match="No such calibration file"):
        parse_data_spec(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "c.csv"
    bad.write_text("x")
    with pytest.raises(UsageError, match="suffix"):
        parse_data_spec(str(bad))


def test_read_txt_jsonl_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\r\n\r\nthird")
    assert read_documents(parse_data_spec(str(tmp_path / "a.txt"))) == ["first doc\nline two", "second doc", "third"]
    (tmp_path / "lines.txt").write_text("one\ntwo\n")
    assert read_documents(parse_data_spec(str(tmp_path / "lines.txt"))) == ["one", "two"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ["x", "", "y"]))
    spec = parse_data_spec(str(tmp_path / "a.jsonl"), text_field="body")
    assert read_documents(spec) == ["x", "y"]
    with pytest.raises(UsageError, match="no field 'text'.*body"):
        read_documents(parse_data_spec(str(tmp_path / "a.jsonl")))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "a.parquet")
    assert read_documents(parse_data_spec(str(tmp_path / "a.parquet"))) == ["p1", "p2"]


def test_calibration_and_evaluation_are_disjoint_documents(docs, tiny_tokenizer):
    splits = split_documents(docs, tiny_tokenizer, seq_len=32, n_calib=20, n_eval=5, seed=0)
    assert splits.calib.shape == (20, 32) and splits.eval.shape == (5, 32)
    assert splits.calib.dtype == torch.long
    # Re-derive which tokens came from evaluation documents: no calibration
    # sequence may contain a 12-token window of an evaluation document.
    eval_docs = [d for d in docs if doc_bucket(d) < 0.1]
    calib_docs = [d for d in docs if doc_bucket(d) >= 0.1]
    assert eval_docs and calib_docs
    windows = set()
    for d in eval_docs:
        ids = tiny_tokenizer(d, add_special_tokens=False)["input_ids"]
        windows |= {tuple(ids[i:i + 12]) for i in range(len(ids) - 11)}
    for row in splits.calib.tolist():
        assert not any(tuple(row[i:i + 12]) in windows for i in range(len(row) - 11))


def test_splits_are_deterministic_per_seed(docs, tiny_tokenizer):
    a = split_documents(docs, tiny_tokenizer, seq_len=32, n_calib=10, n_eval=3, seed=1)
    b = split_documents(docs, tiny_tokenizer, seq_len=32, n_calib=10, n_eval=3, seed=1)
    c = split_documents(docs, tiny_tokenizer, seq_len=32, n_calib=10, n_eval=3, seed=2)
    assert torch.equal(a.calib, b.calib) and torch.equal(a.eval, b.eval)
    assert not torch.equal(a.calib, c.calib)


def test_sequences_start_with_bos_when_tokenizer_uses_one(docs, tiny_tokenizer):
    from transformers import PreTrainedTokenizerFast

    class WithBos(PreTrainedTokenizerFast):
        def __call__(self, text, add_special_tokens=True, **kw):
            out = super().__call__(text, add_special_tokens=add_special_tokens, **kw)
            if add_special_tokens and isinstance(text, str):
                out["input_ids"] = [self.bos_token_id] + out["input_ids"]
            return out

    tok = WithBos(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<|im_start|>",
                  eos_token="<|im_end|>")
    splits = split_documents(docs, tok, seq_len=16, n_calib=4, n_eval=2, seed=0)
    assert (splits.calib[:, 0] == tok.bos_token_id).all()
    assert (splits.calib[:, 1:] != tok.bos_token_id).all()


def test_single_document_falls_back_to_positional_split(tiny_tokenizer):
    text = " ".join(tiny_corpus(200))
    splits = split_documents([text], tiny_tokenizer, seq_len=32, n_calib=100, n_eval=100, seed=0)
    assert splits.calib.shape[0] >= 1 and splits.eval.shape[0] >= 1
    assert any("position" in n for n in splits.notes)
    calib_rows = {tuple(r) for r in splits.calib.tolist()}
    assert not calib_rows & {tuple(r) for r in splits.eval.tolist()}


def test_too_little_text_is_a_usage_error(tiny_tokenizer):
    with pytest.raises(UsageError, match="fewer than"):
        split_documents(["tiny"], tiny_tokenizer, seq_len=64, n_calib=1, n_eval=1, seed=0)


def test_self_generated_data_is_seeded_split_by_index_and_cached(tiny_llama_dir, tmp_path):
    from llmshrink.models import load_model, load_tokenizer

    model, tok = load_model(str(tiny_llama_dir)), load_tokenizer(str(tiny_llama_dir))
    cache = tmp_path / "self.safetensors"
    a = self_splits(model, tok, seq_len=12, n_calib=5, n_eval=2, seed=7, cache_path=cache)
    assert a.calib.shape == (5, 12) and a.eval.shape == (2, 12) and cache.is_file()
    b = self_splits(model, tok, seq_len=12, n_calib=5, n_eval=2, seed=7)
    assert torch.equal(a.calib, b.calib) and torch.equal(a.eval, b.eval)
    special = set(tok.all_special_ids)
    assert not set(a.calib[:, 0].tolist()) & special
    # The cache is read back instead of sampling again (a different model would differ).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    c = self_splits(model, tok, seq_len=12, n_calib=5, n_eval=2, seed=7, cache_path=cache)
    assert torch.equal(a.calib, c.calib)


def test_token_splits_self_needs_model(tiny_tokenizer):
    with pytest.raises(ValueError, match="needs the model"):
        token_splits("self", tiny_tokenizer)


def test_more_self_generated_rows_extend_the_fewer(tiny_llama_dir):
    # recovery asks for more rows than the search; export (no recovery) must quantize on the same first rows
    from llmshrink.models import load_model, load_tokenizer
    from llmshrink.models.data import sample_self_tokens

    model, tok = load_model(str(tiny_llama_dir)), load_tokenizer(str(tiny_llama_dir))
    few = sample_self_tokens(model, tok, n=8, seq_len=10, seed=3, batch_size=4)
    more = sample_self_tokens(model, tok, n=14, seq_len=10, seed=3, batch_size=4)
    assert torch.equal(more[:8], few)


def test_more_document_rows_extend_the_fewer(docs, tiny_tokenizer):
    few = split_documents(docs, tiny_tokenizer, seq_len=32, n_calib=6, n_eval=3, seed=4)
    more = split_documents(docs, tiny_tokenizer, seq_len=32, n_calib=15, n_eval=3, seed=4)
    assert torch.equal(more.calib[:6], few.calib)
    assert not torch.equal(more.calib[:6], split_documents(docs, tiny_tokenizer, seq_len=32, n_calib=6, n_eval=3,
                                                            seed=5).calib)
