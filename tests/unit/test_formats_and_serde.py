import json
from dataclasses import dataclass

import pytest

from llmshrink import serde
from llmshrink.errors import UsageError
from llmshrink.formats import ALIASES, all_formats, at_least_as_faithful, parse_format


def test_every_format_name_parses_back():
    for f in all_formats():
        assert parse_format(f.name) == f


def test_aliases_and_case():
    assert parse_format("INT4").name == ALIASES["int4"]
    assert parse_format("int8").act == "int8-tensor" and parse_format("int8").group_size is None
    fmt = parse_format("w2g64a8z")
    assert (fmt.weight_bits, fmt.group_size, fmt.act, fmt.symmetric) == (2, 64, "int8-block", False)


@pytest.mark.parametrize("bad", ["w3g32", "w4g48", "fp8", "w4", "int5", ""])
def test_bad_formats_are_usage_errors(bad):
    with pytest.raises(UsageError, match="Unknown precision format"):
        parse_format(bad)


def test_bits_per_weight_counts_scales():
    assert parse_format("fp32").bits_per_weight() == 32
    assert parse_format("w4g32").bits_per_weight() == pytest.approx(4.5)
    assert parse_format("w4g32z").bits_per_weight() == pytest.approx(4.625)


@serde.serializable("_TestThing")
@dataclass(frozen=True)
class Thing:
    a: int
    b: tuple[int, ...] = ()


def test_serde_round_trip_and_refusals():
    t = Thing(1, (2, 3))
    assert serde.loads(serde.dumps(t)) == t
    d = serde.to_dict(t)
    with pytest.raises(UsageError, match="Unknown object type"):
        serde.from_dict({**d, "_type": "os.system"})
    with pytest.raises(UsageError, match="newer"):
        serde.from_dict({**d, "_version": 99})
    with pytest.raises(UsageError, match="unknown fields"):
        serde.from_dict({**d, "_data": {"a": 1, "evil": 2}})
    with pytest.raises(UsageError, match="Not valid JSON"):
        serde.loads("{")
    with pytest.raises(UsageError, match="Not an llmshrink file"):
        serde.loads(json.dumps({"a": 1}))



@pytest.mark.parametrize("a,b,want", [
    ("w4g32a8", "w4g64a8", True),  # smaller groups
    ("w4g64a8", "w4g32a8", False),
    ("w4g32a8z", "w4g32a8", True),  # a zero point on top
    ("w4g32a8", "w4g32a8z", False),
    ("w8g64a8", "w4g64a8", True),
    ("w8g64a8", "w4g32a8", False),  # more bits, larger groups: not comparable
    ("w4g32", "w4g32a8", True),  # float activations
    ("w4g32a8", "w4g64", False),
    ("fp32", "w8a8", True),
    ("w8a8", "fp32", False),
    ("w4g32a8", "w4g32a8", True),
])
def test_at_least_as_faithful_is_a_partial_order_over_every_axis(a, b, want):
    assert at_least_as_faithful(a, b) is want
