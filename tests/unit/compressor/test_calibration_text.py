import torch

from llmshrink.compressor.calibration_text import calibration_splits, n_rows
from llmshrink.compressor.config import CompressConfig
from llmshrink.compressor.recover import RecoveryConfig
from llmshrink.compressor.search import SearchConfig


def test_recovery_reads_more_rows_and_export_quantizes_on_the_runs_first(tiny_llama_dir, monkeypatch, tmp_path):
    # compress calibrates the search on its first n_calib rows, GPTQ on its first n_quant, and trains recovery
    # on more; export (no recovery) must quantize on exactly the run's first n_quant rows without sampling the rest
    from llmshrink.models import load_model, load_tokenizer, resolve_model
    from llmshrink.models.load import fingerprint

    monkeypatch.setenv("LLMSHRINK_HOME", str(tmp_path))
    source = resolve_model(str(tiny_llama_dir))
    hf, tok = load_model(source).float().eval(), load_tokenizer(source)
    cfg = CompressConfig(model=str(tiny_llama_dir), target="cpu", budgets_ms=(1.0,), n_calib=8, n_quant=70,
                         search=SearchConfig(seq_len=16), recovery=RecoveryConfig(rows=150))
    assert n_rows(cfg) == 150 and n_rows(cfg, whole_run=False) == 70
    # without recovery a run still reads the screening rows after the quantizer's
    assert n_rows(CompressConfig(model="m", target="cpu", budgets_ms=(1.0,), recovery=RecoveryConfig(steps=0))) == 576
    run = calibration_splits(cfg, hf, tok, fingerprint(source))
    assert run.calib.shape == (150, 16) and run.eval.shape == (8, 16)
    exported = calibration_splits(cfg, hf, tok, fingerprint(source), whole_run=False)
    assert exported.calib.shape == (70, 16) and torch.equal(exported.calib, run.calib[:70])
    assert torch.equal(exported.eval, run.eval)  # the held-out rows do not move with the number of others
