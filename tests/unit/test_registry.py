import pytest

from llmshrink.errors import UnknownNameError, UsageError
from llmshrink.registry import Registry, suggest


def test_get_returns_registered_objects_in_order():
    reg: Registry[int] = Registry("thing")
    reg.register("b", 2)
    reg.register("a", 1)
    assert reg.names() == ["b", "a"]
    assert reg.get("a") == 1 and "b" in reg and len(reg) == 2


def test_register_twice_is_refused_unless_overwrite():
    reg: Registry[int] = Registry("thing")
    reg.register("x", 1)
    with pytest.raises(ValueError):
        reg.register("x", 2)
    reg.register("x", 3, overwrite=True)
    assert reg.get("x") == 3


def test_lazy_entry_is_imported_on_first_get():
    reg: Registry = Registry("function")
    reg.register("join", "os.path:join")
    import os.path

    assert reg.get("join") is os.path.join


def test_lazy_entry_is_checked_against_base():
    reg: Registry = Registry("number", base=int)
    reg.register("pi", "math:pi")
    with pytest.raises(TypeError):
        reg.get("pi")


def test_unknown_name_is_a_usage_error_with_nearest_names():
    reg: Registry[int] = Registry("target")
    for n in ("a100", "h100", "cpu", "jetson-orin"):
        reg.register(n, 0)
    with pytest.raises(UnknownNameError) as ei:
        reg.get("a10")
    assert isinstance(ei.value, UsageError) and ei.value.exit_code == 2
    assert ei.value.suggestions[0] == "a100"
    assert "a100" in str(ei.value)


def test_suggest_prefers_substring_then_similarity():
    known = ["smollm2-135m", "qwen2-0.5b", "tinyllama"]
    assert suggest("smollm", known)[0] == "smollm2-135m"
    assert suggest("smolm2", known)[0] == "smollm2-135m"
    assert suggest("qwen", known, n=1) == ["qwen2-0.5b"]
    # Even nonsense gets the closest real names, never an empty list.
    assert len(suggest("zzz", known, n=2)) == 2
