import pytest

from llmshrink.errors import UnknownNameError, UsageError
from llmshrink.models import resolve_model


def test_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = resolve_model("smollm2-135m")
    assert src.kind == "builtin" and src.builtin.name == "smollm2-135m"


def test_local_directory_wins_over_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "config.json").write_text("{}")
    src = resolve_model("smollm2-135m")
    assert src.kind == "local_dir" and src.ref == str(tmp_path / "smollm2-135m")


def test_gguf_file_and_directory_with_one_gguf(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)).kind == "gguf"
    assert resolve_model(str(tmp_path)).ref == str(f)


def test_local_dir_with_config_wins_over_gguf_inside(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path)).kind == "local_dir"


def test_hub_id_with_revision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = resolve_model("HuggingFaceTB/SmolLM2-135M@main")
    assert (src.kind, src.ref, src.revision) == ("hub", "HuggingFaceTB/SmolLM2-135M", "main")
    assert src.describe() == "hub:HuggingFaceTB/SmolLM2-135M@main"


def test_unknown_bare_name_suggests_nearest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownNameError) as ei:
        resolve_model("smolm2")
    assert ei.value.exit_code == 2
    assert ei.value.suggestions[0] == "smollm2-135m"
    assert "hub id" in ei.value.hint


@pytest.mark.parametrize("bad", ["./missing-dir", "/nonexistent/model.gguf", "~/nope.gguf"])
def test_missing_paths_are_usage_errors(bad):
    with pytest.raises(UsageError, match="No such file"):
        resolve_model(bad)


def test_directory_without_model(tmp_path):
    with pytest.raises(UsageError, match="holds no model"):
        resolve_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UsageError, match="not a .gguf"):
        resolve_model(str(f))
