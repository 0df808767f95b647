import numpy as np
import pytest

from llmshrink.errors import UsageError
from llmshrink.targets.table import LatencyTable, OpEntry, Provenance, load_table, uniform_calls


def _table(entries):
    return LatencyTable("t", "cpu", Provenance(kind="measured", command="test"), tuple(entries))


def test_fit_recovers_a_bilinear_linear_cost_and_interpolates_off_grid():
    truth = lambda k, n: 0.01 + 1e-5 * k + 2e-5 * n + 3e-8 * k * n  # noqa: E731
    grid = [64, 256, 576, 1536]
    t = _table(OpEntry("linear", "decode", {"rows": 1, "k": k, "n": n}, "fp32", truth(k, n))
               for k in grid for n in grid)
    cm = t.models[("linear", "fp32", 1)]
    assert np.allclose(cm.coef, (0.01, 1e-5, 2e-5, 3e-8), rtol=1e-6)
    assert cm.rel_rmse < 1e-9
    assert cm({"k": 320, "n": 960}) == pytest.approx(truth(320, 960), rel=1e-9)
    assert cm.covers({"k": 320, "n": 960}) and not cm.covers({"k": 4096, "n": 960})


def test_op_time_fits_are_non_negative_so_predictions_are_monotone():
    rng = np.random.default_rng(0)
    # time truly independent of k, plus noise: an unconstrained fit would often give k a negative slope
    entries = [OpEntry("linear", "decode", {"rows": 1, "k": int(k), "n": int(n)}, "w4g32",
                       0.02 + 1e-5 * n * (1 + 0.05 * rng.standard_normal()))
               for k, n in rng.integers(32, 1536, (60, 2))]
    cm = _table(entries).models[("linear", "w4g32", 1)]
    assert all(c >= 0 for c in cm.coef)


def test_overhead_fit_ignores_bursts_of_machine_noise():
    rng = np.random.default_rng(1)
    entries = [OpEntry("overhead", "decode", {"rows": 1, "layers": L}, "", -0.5 + 0.02 * L + 0.01 * rng.standard_normal())
               for L in range(5, 31) for _ in range(2)]
    entries[3] = OpEntry("overhead", "decode", {"rows": 1, "layers": 6}, "", 8.0)  # a noisy neighbour
    entries[20] = OpEntry("overhead", "decode", {"rows": 1, "layers": 15}, "", -9.0)
    cm = _table(entries).models[("overhead", "decode")]
    assert cm({"rows": 1, "layers": 20}) == pytest.approx(-0.5 + 0.4, abs=0.02)


@pytest.mark.parametrize("name", ["t.json", "t.json.gz"])
def test_table_round_trips_through_json_and_gzip(tmp_path, name):
    t = _table([OpEntry("attention", "decode", {"rows": 1, "past": p, "heads": 4, "kv_heads": 2, "head_dim": 16,
                                                "batch": 1}, "", 0.01 + 1e-5 * p) for p in (8, 64, 256)])
    back = load_table(t.save(tmp_path / name))
    assert back == t
    assert back.models[("attention", "decode")].coef == t.models[("attention", "decode")].coef


def test_load_table_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(UsageError, match="No such latency table file"):
        load_table(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="No built-in latency table"):
        load_table("no-such-table")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a latency table"):
        load_table(tmp_path / "bad.json")


def _cpu_table(**host):
    return LatencyTable("cpu-x", "cpu", Provenance(kind="measured", host={"runtime": "onnxruntime-cpu", **host}), ())


def test_host_mismatch_names_what_differs_from_this_machine():
    import os

    from llmshrink.host import cpu_features, cpu_id, cpu_model
    from llmshrink.targets.table import host_mismatch

    here = dict(cpu=cpu_model(), cpu_id=cpu_id(), isa=list(cpu_features()), cores=os.cpu_count())
    assert host_mismatch(_cpu_table(**here)) is None
    assert host_mismatch(_cpu_table(cpu=cpu_model())) is None  # an older table that recorded less
    other_isa = [f for f in ("avx2", "avx512_vnni") if f not in here["isa"]] + [f for f in here["isa"] if f != "avx2"]
    why = host_mismatch(_cpu_table(**{**here, "isa": other_isa, "cores": os.cpu_count() + 6}))
    assert why and "isa" in why and "cores" in why and "targets profile cpu" in why
    gpu = LatencyTable("a100-x", "a100", Provenance(kind="analytical", host={"cpu": "elsewhere"}), ())
    assert host_mismatch(gpu) is None


def test_a_table_profiled_on_this_machine_overrides_the_built_in_one(llmshrink_home):
    from llmshrink.targets.table import profiled_table_path

    builtin = load_table("cpu-smollm2-135m")
    mine = LatencyTable("cpu-smollm2-135m", "cpu", Provenance(kind="measured", command="mine"), builtin.entries[:50])
    mine.save(profiled_table_path("cpu-smollm2-135m"))
    assert load_table("cpu-smollm2-135m").provenance.command == "mine"


def _calls(anchors: bool):
    """Profiled calls whose w4g32a8 and w8g64a8 node times (one kernel class) always come in one proportion in
    random models, so a wall-time fit cannot tell their node-to-wall scales apart (true: 0.7 and 1.0, overhead
    0.5 ms); with ``anchors``, uniform calls of each format as well."""
    rng = np.random.default_rng(0)
    out, call = [], 0

    def one(parts: dict[str, float], layers: int):
        nonlocal call
        wall = 0.5 + 0.7 * parts.get("w4g32a8", 0.0) + 1.0 * parts.get("w8g64a8", 0.0)
        for fmt, ms in parts.items():
            for j in range(layers):
                out.append(OpEntry("linear", "decode", {"rows": 1, "k": 64 * (j + 1), "n": 64, "call": call}, fmt,
                                   ms / layers, 0.0, 5))
        out.append(OpEntry("wall", "decode", {"rows": 1, "past": 8, "layers": layers, "call": call}, "", wall, 0.0, 5))
        call += 1

    for _ in range(24):
        x, layers = float(rng.uniform(1, 6)), int(rng.integers(4, 12))
        one({"w4g32a8": 0.6 * x, "w8g64a8": 0.4 * x}, layers)
    for fmt in ("w4g32a8", "w8g64a8") if anchors else ():
        for x in (2.0, 4.0, 6.0):
            one({fmt: x}, 10)
    return out


def test_uniform_anchor_calls_give_formats_of_one_kernel_class_scales_of_their_own():
    table = _table(_calls(anchors=True))
    assert len(table.uniform_calls()) == 6 and not _table(_calls(anchors=False)).uniform_calls()
    cal = table.calibration
    assert cal.anchored == {"w4g32a8", "w8g64a8"}
    assert cal.scale("decode", "linear", "w4g32a8") == pytest.approx(0.7, rel=0.03)
    assert cal.scale("decode", "linear", "w8g64a8") == pytest.approx(1.0, rel=0.03)
    assert cal.scale("decode", "linear", "w4g64a8") == 1.0  # no anchor, no samples of its class: measured times
    # the same table without its anchors: one scale for the class, between the two
    bare = table.without_anchors().calibration
    assert len(table.without_anchors().entries) == len(_table(_calls(anchors=False)).entries)
    assert not bare.anchored and abs(bare.scale("decode", "linear", "w4g32a8") - 0.7) > 0.05
    # op entries without their call's wall (an adapted table's copies of its source's) anchor nothing
    unwalled = _table([e for e in _calls(anchors=True) if e.op != "wall"])
    assert not unwalled.uniform_calls()


def _mispriced_anchor_table():
    """Calls whose node times follow each format's true cost (w4g32a8: 1e-4 ms per k*n, w8g64a8: 1.5e-4) and
    whose wall is 0.3 ms plus their node times; random mixes, then one uniform anchor call per format. Besides
    the calls, w8g64a8 has ten times as many uncalled entries 30 % over its true cost (an adapted table's scaled
    copies of its source), so its cost models over-price it while the calls' node times do not."""
    rng = np.random.default_rng(1)
    cost = {"w4g32a8": 1e-4, "w8g64a8": 1.5e-4}
    out, call = [], 0

    def one(fmts: list[str]):
        nonlocal call
        total = 0.0
        for j, fmt in enumerate(fmts):
            k = 64 * (1 + j % 4)
            ms = cost[fmt] * k * 128
            total += ms
            out.append(OpEntry("linear", "decode", {"rows": 1, "k": k, "n": 128, "call": call}, fmt, ms, 0.0, 5))
        out.append(OpEntry("wall", "decode", {"rows": 1, "past": 8, "layers": len(fmts), "call": call}, "",
                           0.3 + total, 0.0, 5))
        call += 1

    for _ in range(20):
        one([str(f) for f in rng.choice(list(cost), size=int(rng.integers(8, 16)))])
    for fmt in cost:
        one([fmt] * 12)
    for j in range(4):
        k = 64 * (1 + j)
        out += [OpEntry("linear", "decode", {"rows": 1, "k": k, "n": 128}, "w8g64a8", 1.3 * cost["w8g64a8"] * k * 128,
                        0.0, 5)] * 40
    return _table(out)


def test_anchor_fit_prices_uniform_models_as_their_anchors_measured_apart():
    table = _mispriced_anchor_table()
    anchors = {fmt: call for (_, call), fmt in uniform_calls(table.entries).items()}
    wall = {fmt: next(e.mean_ms for e in table.entries if e.op == "wall" and e.dims["call"] == c)
            for fmt, c in anchors.items()}
    measured = wall["w8g64a8"] / wall["w4g32a8"]

    def predicted(t):
        return t.replayed_ms("decode", anchors["w8g64a8"]) / t.replayed_ms("decode", anchors["w4g32a8"])

    fitted = table.with_anchor_fit()
    assert predicted(table) > 1.08 * measured  # the copies pull w8g64a8 up ~12 %
    assert predicted(fitted) == pytest.approx(measured, rel=0.02)
    assert not table.calibration.anchor_fit and fitted.models is table.models
    fit = fitted.calibration.anchor_fit
    assert set(fit) == {("decode", "w4g32a8"), ("decode", "w8g64a8")}
    assert fit[("decode", "w8g64a8")] < fit[("decode", "w4g32a8")]
    assert np.prod(list(fit.values())) == pytest.approx(1.0)  # relative: the level stays the calibration's
    unanchored = _table([e for e in table.entries if "call" not in e.dims or e.dims["call"] < 20]).with_anchor_fit()
    assert not unanchored.calibration.anchor_fit
