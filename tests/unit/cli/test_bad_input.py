"""The bad-input catalogue: each way a user can get the input wrong, with its exit code and message.

Every case runs the real CLI (in-process) and must end with its documented exit code, a message that
names the problem and one that says what to do, and no Python traceback (tracebacks are for
``--debug``). The table of cases is printed at the end of the test run (see ``conftest.py``), and the
README's exit-code table is checked against the codes used here.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmshrink.cli import cli

CATALOGUE: list[tuple[str, int, str]] = []  # (case, exit code, first line of the message), for the summary


@dataclass(frozen=True)
class Case:
    """One bad input: the command (``{tiny}``, ``{tmp}``, ``{target}`` are filled in), what the
    files it reads hold, the exit code, and text the message must contain (the problem, the fix)."""

    name: str
    args: tuple[str, ...]
    code: int
    problem: str  # a regex the output must match: what was wrong
    fix: str  # a regex the output must match: what to do
    files: dict[str, str | bytes] = field(default_factory=dict)  # name under {tmp} -> content
    patch: str | None = None  # a name of PATCHES applied for this case


TARGET_YAML = """name: board
description: a test board
device: host CPU
runtime: onnxruntime-cpu
formats: [fp32, w4g32]
default_workload: decode:batch=1,ctx=16
"""

COMPRESS = ("compress", "--model", "{tiny}", "--target", "{target}", "--steps", "2", "--recovery-steps", "0")

CASES = [
    # -- where the run goes
    Case("unwritable --out", (*COMPRESS, "--latency", "{tight}", "--out", "/proc/llmshrink-run"), 2,
         r"Cannot write the run directory /proc/llmshrink-run", r"--out"),
    Case("non-empty --out", (*COMPRESS, "--latency", "{tight}", "--out", "{tmp}/full"), 2,
         r"already exists and is not empty", r"--resume|another --out", files={"full/notes.txt": "mine"}),
    Case("--out is a file", (*COMPRESS, "--latency", "{tight}", "--out", "{tmp}/afile"), 2,
         r"run directory .*afile is a file", r"Give --out a directory", files={"afile": "x"}),
    Case("--resume with nothing to resume", (*COMPRESS, "--latency", "{tight}", "--out", "{tmp}/empty", "--resume"),
         2, r"Nothing to resume", r"without --resume"),
    Case("--resume on another config's run", (*COMPRESS, "--latency", "{tight}", "--out", "{tmp}/other", "--resume"),
         2, r"other settings", r"same command|settings are in", patch="other_run"),
    # -- the budget
    Case("compress with neither a budget nor a plan", (*COMPRESS, "--out", "{tmp}/nobudget"), 2,
         r"Missing --latency", r"--latency 30ms.*--spec"),
    Case("malformed latency", (*COMPRESS, "--latency", "fast"), 2, r"'fast' is not a positive latency",
         r"30ms"),
    Case("zero latency", (*COMPRESS, "--latency", "0ms"), 2, r"not a positive latency", r"30ms"),
    Case("negative latency", (*COMPRESS, "--latency", "-3ms"), 2, r"not a positive latency", r"30ms"),
    Case("latency in hours", (*COMPRESS, "--latency", "2h"), 2, r"'2h' is not a positive latency", r"30ms"),
    Case("unitless latency means ms (too tight here)", (*COMPRESS, "--latency", "0.0001", "--out", "{tmp}/t"), 3,
         r"budget of 0\.00 ms is below the fastest subnet", r"Give --latency"),
    Case("unknown format in 0.7xFORMAT", (*COMPRESS, "--latency", "0.7xint5"), 2,
         r"Unknown precision format 'int5'", r"Formats are"),
    Case("relative budget to a format the target lacks", (*COMPRESS, "--latency", "0.7xw8g32", "--out", "{tmp}/t"),
         2, r"has no kernel for w8g32", r"Use one of its formats"),
    Case("relative budget to a format that cannot quantize the model", ("compress", "--model", "{tmp}/smol",
                                                                       "--target", "a100", "--latency", "0.7xw4g128",
                                                                       "--out", "{tmp}/t"),
         2, r"cannot be exported in uniform w4g128: .*576 is not a multiple of group size 128", r"group that divides",
         patch="smollm2_config"),
    Case("budget below the fastest subnet", (*COMPRESS, "--latency", "0.001ms", "--out", "{tmp}/t"), 3,
         r"below the fastest subnet", r"Give --latency"),
    Case("params budget not a count", (*COMPRESS, "--latency", "{tight}", "--params-budget", "lots"), 2,
         r"--params-budget 'lots' is not a count", r"100M"),
    Case("bad --workload", (*COMPRESS, "--latency", "{tight}", "--workload", "warp:ctx=2"), 2,
         r"warp", r"decode|prefill"),
    Case("bad --tolerance", (*COMPRESS, "--latency", "{tight}", "--tolerance", "tight"), 2,
         r"--tolerance 'tight' is not a number", r"10%"),
    # -- the target
    Case("unknown target", ("compress", "--target", "a1000", "--latency", "30ms"), 2, r"Unknown target 'a1000'",
         r"a100"),
    Case("target YAML with missing keys", ("compress", "--target", "{tmp}/board.yaml", "--latency", "30ms"), 2,
         r"is missing runtime, formats", r"A target file needs", files={"board.yaml": "name: board\ndescription: x\n"
                                                                        "device: y\ndefault_workload: decode\n"}),
    Case("target YAML with unknown keys", ("compress", "--target", "{tmp}/board.yaml", "--latency", "30ms"), 2,
         r"unknown fields clock_mhz", r"may set|fields are",
         files={"board.yaml": TARGET_YAML + "clock_mhz: 900\n"}),
    Case("target YAML that is not YAML", ("compress", "--target", "{tmp}/board.yaml", "--latency", "30ms"), 2,
         r"board\.yaml is not valid YAML", r"line 1", files={"board.yaml": "name: [unclosed\n"}),
    # -- the model
    Case("no such model directory", ("compress", "--model", "{tmp}/nothing/", "--target", "cpu", "--latency", "5ms"),
         2, r"No such file or directory: .*nothing", r"Pass a built-in name"),
    Case("truncated safetensors", ("compress", "--model", "{tmp}/broken", "--target", "{target}", "--latency",
                                   "{tight}", "--out", "{tmp}/t"),
         2, r"Could not load .*broken.*header", r"truncated or corrupt.*copy the model again", patch="truncated_model"),
    Case("corrupt GGUF", ("models", "info", "{tmp}/bad.gguf"), 2, r"bad\.gguf.*(not a valid GGUF|corrupt)",
         r"download|copy|again", files={"bad.gguf": b"GGUF\x03\x00\x00\x00garbage"}),
    # -- data
    Case("calibration text shorter than one sequence",
         (*COMPRESS, "--latency", "{tight}", "--calib-data", "{tmp}/short.txt", "--out", "{tmp}/t"), 2,
         r"short\.txt has fewer than \d+ tokens", r"more text|longer|self",
         files={"short.txt": "a few words only.\n\nand a second line.\n"}),
    Case("no such calibration file", (*COMPRESS, "--latency", "{tight}", "--calib-data", "{tmp}/none.txt"), 2,
         r"No such calibration file", r"existing"),
    Case("search space YAML with an unknown field", (*COMPRESS, "--latency", "{tight}", "--space", "{tmp}/s.yaml"), 2,
         r"unknown fields depth", r"may set", files={"s.yaml": "depth: 3\n"}),
    # -- bundles
    Case("corrupt ONNX in a bundle", ("run", "{tmp}/bundle", "--prompt", "hi"), 1,
         r"model\.onnx.*(differs|changed|sha256)", r"Rebuild|copy it again", patch="corrupt_bundle"),
    Case("truncated ONNX without a manifest", ("run", "{tmp}/half", "--prompt", "hi"), 2,
         r"not a bundle|no manifest", r"export", files={"half/model.onnx": b"\x08\x07"}),
    Case("validate a bundle with no prediction", ("validate", "{tmp}/bundle"), 2, r"no predicted latency",
         r"--target", patch="bundle"),
    Case("unknown precision format", ("spec", "new", "--uniform", "w9g32", "--out", "{tmp}/s.json"), 2,
         r"Unknown precision format 'w9g32'", r"Formats are"),
    # -- missing extras and hardware
    Case("eval without lm-eval", ("eval", "{tiny}", "--tasks", "arc_easy"), 5, r"lm-eval", r"pip install",
         patch="no_lm_eval"),
    Case("TensorRT build without TensorRT", ("build", "{tmp}/bundle"), 5, r"tensorrt|TensorRT",
         r"target machine|pip install", patch="bundle"),
    Case("validate a TensorRT bundle without TensorRT", ("validate", "{tmp}/trt", "--target", "a100",
                                                         "--workload", "decode:ctx=16"), 5,
         r"Cannot build or time a TensorRT engine here", r"target machine", patch="trt_bundle"),
    # -- the disk
    Case("disk full while a bundle is written", ("export", "--model", "{tiny}", "--out", "{tmp}/full-disk"), 1,
         r"No space left on device: .*manifest\.json", r"Free space", patch="disk_full"),
]


@pytest.fixture(scope="module")
def env(tiny_llama_dir, steady_table, tmp_path_factory):
    """Placeholders: the tiny model, a target YAML with a fixed table, and a budget that needs a search."""
    from llmshrink.compressor.budget import fastest_reachable
    from llmshrink.compressor.space import default_space
    from llmshrink.models import load_config, resolve_model
    from llmshrink.spec import BaseShape
    from llmshrink.targets.predict import predict
    from llmshrink.targets.profile import load_target

    _, target_yaml = steady_table
    target = load_target(str(target_yaml))
    base = BaseShape.from_config(load_config(resolve_model(str(tiny_llama_dir))))
    space = default_space(base, target.formats)
    fastest, _ = fastest_reachable(space, target, target.default_workload, None)
    top = predict(space.largest(), target).total_ms
    return {"tiny": str(tiny_llama_dir), "target": str(target_yaml), "tight": f"{fastest + 0.3 * (top - fastest):.4f}ms"}


def _bundle(tmp: Path, tiny: str) -> Path:
    from llmshrink.exporters.export import export

    export(tiny, None, tmp / "bundle", max_length=64)
    return tmp / "bundle"


def _patch(name: str, tmp: Path, env: dict, monkeypatch) -> None:
    if name == "smollm2_config":  # the default model's shape (hidden 576), config only: no weights load
        from llmshrink.testing import tiny_llama_config

        (tmp / "smol").mkdir()
        tiny_llama_config(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                          num_hidden_layers=2).save_pretrained(tmp / "smol")
    elif name == "other_run":
        from llmshrink import serde
        from llmshrink.compressor.pipeline import RECORD, CompressConfig, CompressRecord

        rec = CompressRecord(CompressConfig(model=env["tiny"], target="cpu", budgets_ms=(1.0,)), 0.5)
        (tmp / "other").mkdir()
        (tmp / "other" / RECORD).write_text(serde.dumps(rec))
    elif name == "truncated_model":
        import shutil

        shutil.copytree(env["tiny"], tmp / "broken")
        f = tmp / "broken" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif name in ("bundle", "corrupt_bundle"):
        b = _bundle(tmp, env["tiny"])
        if name == "corrupt_bundle":
            onnx = b / "model.onnx"
            onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    elif name == "trt_bundle":
        from llmshrink.exporters.export import export
        from llmshrink.models import load_config, resolve_model
        from llmshrink.spec import BaseShape, SubnetSpec

        base = BaseShape.from_config(load_config(resolve_model(env["tiny"])))
        export(env["tiny"], SubnetSpec.uniform(base, "fp16"), tmp / "trt", target="a100", max_length=64)
    elif name == "no_lm_eval":
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    elif name == "disk_full":
        import errno

        from llmshrink import storage

        real = storage.atomic_write_bytes

        def full(path, data):
            if Path(path).name == "manifest.json":
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, data)

        monkeypatch.setattr(storage, "atomic_write_bytes", full)
    else:
        raise AssertionError(name)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_fails_cleanly(case: Case, env, tmp_path, monkeypatch, llmshrink_home):
    monkeypatch.chdir(tmp_path)  # a default --out (runs/...) lands here
    for name, content in case.files.items():
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    if case.patch:
        _patch(case.patch, tmp_path, env, monkeypatch)
    args = [a.format(tmp=tmp_path, **env) for a in case.args]
    res = CliRunner().invoke(cli, args)
    text = res.output
    lines = text.strip().splitlines() or [""]
    CATALOGUE.append((case.name, res.exit_code, next((ln for ln in lines if ln.startswith("error:")), lines[0])))
    assert res.exit_code == case.code, f"{case.name}: exit {res.exit_code}\n{text}\n{res.exc_info}"
    assert "Traceback" not in text and (res.exception is None or isinstance(res.exception, SystemExit)), text
    flat = " ".join(text.split())
    problem = re.search(case.problem, flat)
    assert problem, f"{case.name}: the problem is not named:\n{text}"
    assert re.search(case.fix, flat[problem.end():]), f"{case.name}: no fix is given after the problem:\n{text}"
    assert "internal error" not in flat
    if case.patch == "disk_full":  # no partial bundle is left behind
        assert not (tmp_path / "full-disk").exists() and not list(tmp_path.glob(".full-disk*"))


def test_debug_shows_the_traceback(env, tmp_path):
    res = CliRunner().invoke(cli, ["--debug", "compress", "--target", "a1000", "--latency", "30ms"])
    assert res.exit_code == 2 and "Traceback" in res.output


def test_a_bug_is_one_line_and_debug_raises_it(monkeypatch):
    import llmshrink.doctor

    def broken(*a, **k):
        raise KeyError("boom")

    monkeypatch.setattr(llmshrink.doctor, "machine_report", broken)
    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "internal error: KeyError: 'boom'" in res.output and "llmshrink --debug doctor" in res.output
    res = CliRunner().invoke(cli, ["--debug", "doctor"])
    assert isinstance(res.exception, KeyError)  # re-raised: the traceback is the user's to see


def test_library_warnings_stay_out_of_the_output(monkeypatch, caplog):
    import logging
    import warnings

    import llmshrink.doctor

    real = llmshrink.doctor.machine_report

    def noisy(*a, **k):
        warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=1)
        return real(*a, **k)

    monkeypatch.setattr(llmshrink.doctor, "machine_report", noisy)
    with caplog.at_level(logging.DEBUG, logger="py.warnings"), warnings.catch_warnings():
        warnings.simplefilter("always")
        res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 0 and "past_key_values" not in res.output
    (rec,) = [r for r in caplog.records if "past_key_values" in r.getMessage()]
    assert rec.levelno == logging.DEBUG and "FutureWarning" in rec.getMessage()  # shown with -vv


def test_the_readme_exit_code_table_matches_the_catalogue():
    from llmshrink.errors import Interrupted, LlmshrinkError

    readme = (Path(__file__).parents[3] / "README.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|", readme, flags=re.M))
    used = {c.code for c in CASES} | {0, Interrupted.exit_code}
    codes = {int(k) for k in table}
    assert used <= codes, f"README lacks exit codes {used - codes}"
    known = {cls.exit_code for cls in _subclasses(LlmshrinkError)} | {0}
    assert codes == known, f"README codes {sorted(codes)} vs the error tree's {sorted(known)}"


def _subclasses(cls):
    out = {cls}
    for sub in cls.__subclasses__():
        out |= _subclasses(sub)
    return out
