"""The lm-eval adapter gives lm-eval's own `hf` model's numbers, on torch and on a bundle."""

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is not installed")

from lm_eval.api.instance import Instance  # noqa: E402

from llmshrink import api  # noqa: E402
from llmshrink.testing import tiny_corpus  # noqa: E402


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tmp_path_factory):
    from lm_eval.models.huggingface import HFLM

    from llmshrink.evaluation.lm_eval_adapter import LlmshrinkLM

    out = tmp_path_factory.mktemp("lmeval") / "b"
    api.export(str(tiny_llama_dir), None, out, max_length=128)
    ref = HFLM(pretrained=str(tiny_llama_dir), device="cpu", batch_size=1, max_length=128)
    return ref, LlmshrinkLM(str(tiny_llama_dir), max_length=128), LlmshrinkLM(str(out), max_length=128)


def _req(kind, args, i):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_loglikelihood_matches_the_hf_reference(models):
    ref, torch_lm, bundle_lm = models
    lines = tiny_corpus(12, seed=5)
    reqs = [_req("loglikelihood", (a, " " + b.split()[0]), i) for i, (a, b) in enumerate(zip(lines, lines[1:], strict=False))]
    reqs.append(_req("loglikelihood", ("", lines[0]), 99))  # empty context: the prefix token conditions
    want = ref.loglikelihood(reqs)
    for lm in (torch_lm, bundle_lm):
        got = lm.loglikelihood(reqs)
        for (a, ga), (b, gb) in zip(got, want, strict=True):
            assert a == pytest.approx(b, abs=2e-3)
            assert ga == gb


def test_rolling_loglikelihood_matches_the_hf_reference(models):
    ref, torch_lm, bundle_lm = models
    text = " ".join(tiny_corpus(40, seed=6))  # longer than max_length: several windows
    reqs = [_req("loglikelihood_rolling", (text,), 0)]
    want = ref.loglikelihood_rolling(reqs)[0]
    assert torch_lm.loglikelihood_rolling(reqs)[0] == pytest.approx(want, rel=1e-4)
    assert bundle_lm.loglikelihood_rolling(reqs)[0] == pytest.approx(want, rel=1e-4)


def test_generate_until_matches_greedy_reference(models):
    ref, torch_lm, bundle_lm = models
    reqs = [_req("generate_until", (tiny_corpus(1, seed=7)[0], {"until": ["\n"], "max_gen_toks": 12}), 0)]
    want = ref.generate_until(reqs)
    assert torch_lm.generate_until(reqs) == want
    assert bundle_lm.generate_until(reqs) == want


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A tiny multiple-choice lm-eval task (folder, name), built here from the tiny corpus."""
    import json

    d = tmp_path_factory.mktemp("task")
    lines = tiny_corpus(40, seed=8)
    docs = [{"q": a, "choices": [" " + b.split()[0], " " + c.split()[0]], "label": 0}
            for a, b, c in zip(lines[0::3], lines[1::3], lines[2::3], strict=False)]
    (d / "data.jsonl").write_text("\n".join(json.dumps(x) for x in docs))
    (d / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / "data.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    return d, "tiny_mc"


def test_cli_eval_tasks_on_a_local_task_records_accuracy(models, tiny_task):
    """The CLI's accuracy on a local task equals lm-eval's hf model on it."""
    import json

    from click.testing import CliRunner
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llmshrink.cli import cli
    from llmshrink.exporters.bundle import load_manifest

    folder, name = tiny_task
    ref, _, bundle_lm = models
    want = simple_evaluate(model=ref, tasks=[name], task_manager=TaskManager(include_path=str(folder)))
    acc = want["results"][name]["acc,none"]
    bundle = bundle_lm.scorer.name
    res = CliRunner().invoke(cli, ["eval", bundle, "--tasks", name, "--include-path", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["tasks"][0]
    assert got["task"] == name and got["metrics"]["acc"] == pytest.approx(acc)
    assert load_manifest(bundle).quality[f"{name}:acc"] == pytest.approx(acc)
    res = CliRunner().invoke(cli, ["eval", bundle, "--tasks", "nope_local"])
    assert res.exit_code == 2 and "render.py" in res.output


def test_lm_eval_own_cli_runs_the_llmshrink_model(models, tiny_task, monkeypatch, capsys):
    folder, name = tiny_task
    bundle = models[2].scorer.name
    monkeypatch.setattr("sys.argv", ["llmshrink-lm-eval", "--model", "llmshrink", "--model_args", f"path={bundle}",
                                     "--tasks", name, "--include_path", str(folder)])
    from llmshrink.evaluation.lm_eval_cli import main

    main()
    out = capsys.readouterr().out
    assert "llmshrink" in out and name in out and "acc" in out
