import json
import random

from click.testing import CliRunner

from llmshrink.cli import cli
from llmshrink.compressor.calibration_text import calibration_splits
from llmshrink.compressor.config import CompressConfig


def test_data_show_by_default_shows_the_split_compress_reads(tiny_llama_dir, llmshrink_home, tmp_path):
    # `data show` is how a user looks at compress's calibration text before a run: with no size options it must
    # build exactly the split a default compress builds (sizes, seed, first sequence), not a split of its own
    from llmshrink.models import load_tokenizer, resolve_model
    from llmshrink.models.load import fingerprint

    rng = random.Random(0)
    words = ["lobster", "harbour", "river", "engine", "season", "match", "album", "castle", "storm", "bridge",
             "county", "record", "station", "forest", "battle", "signal"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 90))) + " ." for _ in range(4000)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs))

    res = CliRunner().invoke(cli, ["data", "show", "--model", str(tiny_llama_dir), "--calib-data", str(corpus),
                                   "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)

    source = resolve_model(str(tiny_llama_dir))
    tok = load_tokenizer(source)
    config = CompressConfig(model=str(tiny_llama_dir), target="cpu", budgets_ms=(1.0,), calib_data=str(corpus))
    run = calibration_splits(config, None, tok, fingerprint(source))
    assert (shown["seq_len"], shown["n_calib"], shown["n_eval"]) == (run.calib.shape[1], len(run.calib), len(run.eval))
    assert shown["n_calib"] > 512  # the quantizer's rows and recovery's, not a short sample of its own
    assert shown["sample"] == tok.decode(run.calib[0][:64])

    # explicit sizes still win
    res = CliRunner().invoke(cli, ["data", "show", "--model", str(tiny_llama_dir), "--calib-data", str(corpus),
                                   "--seq-len", "32", "--n-calib", "5", "--n-eval", "2", "--json"])
    assert res.exit_code == 0, res.output
    small = json.loads(res.output)
    assert (small["seq_len"], small["n_calib"], small["n_eval"]) == (32, 5, 2)
    assert small["calib_tokens"] == 5 * 32
