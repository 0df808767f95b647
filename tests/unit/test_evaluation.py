import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from llmshrink import api
from llmshrink.cli import cli
from llmshrink.errors import UsageError
from llmshrink.evaluation import load_scorer, perplexity
from llmshrink.exporters.bundle import load_manifest
from llmshrink.testing import tiny_corpus


@pytest.fixture(scope="module")
def tiny_bundle(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "b"
    api.export(str(tiny_llama_dir), None, out, max_length=128)
    return out


@pytest.fixture(scope="module")
def text():
    return " ".join(tiny_corpus(60, seed=3))


def test_one_window_equals_plain_cross_entropy(tiny_llama_dir, text):
    s = load_scorer(str(tiny_llama_dir))
    ids = s.encode(text)[:64]
    r = perplexity(s, ids, context=64, stride=63)
    # reference: the HF model itself, not our scorer
    from llmshrink.models import load_model

    hf = load_model(str(tiny_llama_dir))
    with torch.no_grad():
        logits = hf(torch.from_numpy(ids)[None]).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[:-1].double(), torch.from_numpy(ids[1:]))
    assert r.tokens == 63 and r.windows == 1
    assert r.nll == pytest.approx(float(ref), rel=1e-5)


def test_windows_score_each_token_once(tiny_llama_dir, text):
    s = load_scorer(str(tiny_llama_dir))
    ids = s.encode(text)[:200]
    short = perplexity(s, ids, context=64, stride=63)
    overlap = perplexity(s, ids, context=64, stride=16)
    assert short.tokens == overlap.tokens == len(ids) - 1
    assert short.windows == 4 and overlap.windows == 13
    # the stride-16 bookkeeping by hand: token j is scored once, reading up to 64 tokens ending at its window's end
    total = 0.0
    for first in range(1, len(ids), 16):
        end = min(first + 16, len(ids))
        begin = max(0, end - 64)
        lp = s.logprobs(ids[begin:end])
        total -= sum(lp[j - begin - 1, ids[j]] for j in range(first, end))
    assert overlap.nll == pytest.approx(total / (len(ids) - 1), rel=1e-9)


def test_bundle_and_torch_agree_within_one_percent(tiny_llama_dir, tiny_bundle, text):
    t, b = load_scorer(str(tiny_llama_dir)), load_scorer(str(tiny_bundle))
    assert (t.kind, b.kind) == ("torch", "onnxruntime")
    ids = t.encode(text)[:300]
    assert np.array_equal(ids, b.encode(text)[:300])
    pt, pb = perplexity(t, ids, context=128, stride=64), perplexity(b, ids, context=128, stride=64)
    assert pb.ppl == pytest.approx(pt.ppl, rel=0.01)


@pytest.fixture(scope="module")
def tiny_trt_bundle(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "trt"
    api.export(str(tiny_llama_dir), None, out, flavour="trt", max_length=128)
    return out


@pytest.mark.parametrize("backend", ["torch", "ort", "trt"])
@pytest.mark.parametrize("prefix_len", [1, 17])
def test_shared_prefix_scores_equal_whole_sequence_scores(backend, prefix_len, tiny_llama_dir, tiny_bundle,
                                                          tiny_trt_bundle, text):
    target = {"torch": tiny_llama_dir, "ort": tiny_bundle, "trt": tiny_trt_bundle}[backend]
    # batch 2 over 3 suffixes of different lengths: a padded batch and a batch of one (torch)
    s = load_scorer(str(target), batch_size=2)
    ids = s.encode(text)
    prefix, suffixes = ids[:prefix_len], [ids[40:45], ids[50:51], ids[60:72]]
    got = s.score(prefix, suffixes)
    for suffix, (lp, greedy) in zip(suffixes, got, strict=True):
        whole = np.concatenate([prefix, suffix])
        rows = s.logprobs(whole[:-1])[-len(suffix):]
        assert lp == pytest.approx(float(rows[np.arange(len(suffix)), suffix].sum()), abs=1e-3)
        assert greedy == bool((rows.argmax(-1) == suffix).all())
    # the same call twice (the bundle reuses one cache) gives the same scores
    assert [lp for lp, _ in s.score(prefix, suffixes)] == pytest.approx([lp for lp, _ in got])
    greedy_suffix = np.asarray(s.generate(prefix, 4, ()), dtype=np.int64)
    assert [g for _, g in s.score(prefix, [greedy_suffix, suffixes[0]])] == [True, False]


def test_bad_windows_are_usage_errors(tiny_bundle):
    s = load_scorer(str(tiny_bundle))
    with pytest.raises(UsageError, match="stride"):
        perplexity(s, np.arange(10), context=8, stride=8)
    with pytest.raises(UsageError, match="max-length"):
        perplexity(s, np.arange(10), context=1024, stride=8)


def test_cli_eval_ppl_records_into_the_manifest(tiny_bundle, text, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(text)
    res = CliRunner().invoke(cli, ["eval", str(tiny_bundle), "--ppl", str(f), "--context", "64", "--stride", "32",
                                   "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    r = d["perplexity"][0]
    assert d["backend"] == "onnxruntime" and r["context"] == 64 and r["stride"] == 32 and r["ppl"] > 1
    quality = load_manifest(tiny_bundle).quality
    assert quality[f"ppl:t.txt:ctx64:stride32:tokens{r['tokens']}"] == pytest.approx(r["ppl"])
