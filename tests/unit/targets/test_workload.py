import pytest

from llmshrink import serde
from llmshrink.errors import UsageError
from llmshrink.targets.workload import Workload, parse_workload


@pytest.mark.parametrize("text,expect", [
    ("decode:ctx=256", Workload("decode", 1, 256, 0)),
    ("prefill:ctx=128,batch=2", Workload("prefill", 2, 128, 0)),
    ("e2e:ctx=133,new=64", Workload("e2e", 1, 133, 64)),
    ("e2e:ctx=10", Workload("e2e", 1, 10, 64)),
    ("decode", Workload()),
])
def test_parse(text, expect):
    w = parse_workload(text)
    assert w == expect
    assert parse_workload(str(w)) == w
    assert serde.loads(serde.dumps(w)) == w


@pytest.mark.parametrize("bad", ["decod:ctx=1", "decode:ctx=0", "decode:ctx=x", "decode:len=5", "prefill:batch=-1"])
def test_bad_workloads(bad):
    with pytest.raises(UsageError):
        parse_workload(bad)
