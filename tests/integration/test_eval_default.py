"""lm-eval on the real default model: 50 ARC-Easy dev questions, ours against lm-eval's own hf model.

The questions ship with the tests (tests/data, see its README); the task is
built in a temporary folder, so nothing outside the repository is read.
"""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmshrink.cli import cli

pytestmark = pytest.mark.integration

DATA = Path(__file__).parent.parent / "data" / "arc_easy_dev_first50.jsonl"


@pytest.fixture(scope="module")
def arc_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("arc")
    # lm-eval's own arc_easy prompt and choices (lm_eval/tasks/arc/arc_easy.yaml)
    (d / "arc_easy_dev50.yaml").write_text(f"""task: arc_easy_dev50
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {DATA}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return d, "arc_easy_dev50"


def _ours(target: str, task) -> dict[str, float]:
    folder, name = task
    res = CliRunner().invoke(cli, ["eval", target, "--tasks", name, "--include-path", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["tasks"][0]
    assert got["task"] == name and got["samples"] == 50
    return got["metrics"]


def test_default_model_on_50_arc_easy_questions_matches_lm_eval_hf_in_torch_and_as_a_bundle(arc_task, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llmshrink import api
    from llmshrink.exporters.bundle import load_manifest
    from llmshrink.models import load_model, load_tokenizer

    folder, name = arc_task
    ref = HFLM(pretrained=load_model("smollm2-135m"), tokenizer=load_tokenizer("smollm2-135m"), batch_size=8)
    want = simple_evaluate(model=ref, tasks=[name], task_manager=TaskManager(include_path=str(folder)))
    want = {k: want["results"][name][f"{k},none"] for k in ("acc", "acc_norm")}
    assert 0.3 < want["acc"] < 0.7  # the model answers better than chance (0.25) and is no oracle

    torch_run = _ours("smollm2-135m", arc_task)
    # 50 questions: one answer apart is 2 points, so "within 0.5 points" means equal
    assert {k: torch_run[k] for k in want} == pytest.approx(want, abs=1e-9)

    api.export("smollm2-135m", None, tmp_path / "fp32", max_length=256)
    bundle_run = _ours(str(tmp_path / "fp32"), arc_task)
    assert {k: bundle_run[k] for k in want} == pytest.approx(want, abs=1e-9)
    assert load_manifest(tmp_path / "fp32").quality[f"{name}:acc"] == pytest.approx(want["acc"])
