"""The bench: latency bookkeeping against hand values, the metric-agreement run, the typer commands."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from selfcam import bench
from selfcam.bench import LATENCY_METHODS, bench_app, latency, metric_agreement
from selfcam.errors import ConfigError

runner = CliRunner()
TINY = {"backbone": "resnet8", "size": 32, "num_classes": 10, "threads": 1}


def test_interleaving_warmup_slow_rounds_and_medians_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake runners return their own 'time'; the call order and the kept samples are checked by hand."""
    calls: list[str] = []

    def fake(name: str, values: list[float]) -> Any:
        it = iter(values)
        return lambda x: (calls.append(name), next(it))[1]

    monkeypatch.setattr(bench, "_time_ms", lambda fn, x: fn(x))
    runners = {"plain": fake("plain", [99, 1, 5, 3]), "se": fake("se", [99, 2, 8, 4]), "scorecam": fake("scorecam", [7])}
    times = bench._interleaved(runners, torch.zeros(1), repeats=3, warmup=1, slow_rounds=bench._rounds(3, 1))
    # round -1 (warm-up) starts at index -1 % 3 = 2 (scorecam skipped: not a slow round), round 0 at 0, ...
    assert calls == ["plain", "se", "plain", "se", "scorecam", "se", "plain", "plain", "se"]
    assert times == {"plain": [1, 5, 3], "se": [2, 8, 4], "scorecam": [7]}
    assert bench._rounds(20, 3) == {0, 7, 13} and bench._rounds(2, 5) == {0, 1}


def test_latency_document_on_a_tiny_backbone() -> None:
    doc = latency(**TINY, repeats=2, scorecam_repeats=1, warmup=1)
    json.dumps(doc)  # JSON-ready
    assert set(doc) >= {"backbone", "size", "device", "repeats", "ms", "ratio_to_plain", "speedup_vs", "goals"}
    assert (doc["backbone"], doc["size"], doc["repeats"]) == ("resnet8", 32, 2)
    assert list(doc["ms"]) == list(LATENCY_METHODS)
    assert doc["samples"] == {**{m: 2 for m in LATENCY_METHODS}, "scorecam": 1}
    ms = doc["ms"]
    assert all(math.isfinite(t) and t > 0 for t in ms.values())
    for m, t in ms.items():
        assert doc["ratio_to_plain"][m] == pytest.approx(t / ms["plain"])
    assert set(doc["speedup_vs"]) == {"lfi", "lfi-light", "se", "abn"}
    assert doc["speedup_vs"]["se"]["scorecam"] == pytest.approx(ms["scorecam"] / ms["se"])
    assert doc["goals"]["lfi <= 1.35x plain"] == (ms["lfi"] / ms["plain"] <= 1.35)
    assert doc["goals"]["abn >= 300x faster than scorecam"] == (ms["scorecam"] / ms["abn"] >= 300)
    assert "compile" not in doc


def test_latency_subset_always_keeps_plain_and_rejects_unknown_names() -> None:
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    doc = latency(**TINY, repeats=1, warmup=0, methods="se, gradcam")
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads  # left as found
    assert doc["device"] == "cpu (1 thread)" or torch.cuda.is_available()
    assert list(doc["ms"]) == ["plain", "se", "gradcam"]
    assert doc["speedup_vs"]["se"] == {"gradcam": pytest.approx(doc["ms"]["gradcam"] / doc["ms"]["se"])}
    with pytest.raises(ConfigError, match="--methods: unknown name.s. gradcamm; choose from plain, lfi"):
        latency(**TINY, methods="se,gradcamm")
    with pytest.raises(ConfigError, match="nothing chosen"):
        latency(**TINY, methods=" , ")
    with pytest.raises(ConfigError, match="repeats must be an integer >= 1"):
        latency(**TINY, repeats=0)


def test_compile_failure_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: Any) -> Any:
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    doc = latency(**TINY, repeats=1, warmup=0, methods="se", compile=True)
    assert doc["compile"] == {m: {"unavailable": "RuntimeError: no C++ compiler"} for m in ("plain", "se")}
    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # "compiles" to itself: a ratio near 1
    doc = latency(**TINY, repeats=2, warmup=1, methods="se", compile=True)
    assert doc["compile"]["se"]["ms"] > 0
    assert doc["compile"]["se"]["speedup"] == pytest.approx(doc["ms"]["se"] / doc["compile"]["se"]["ms"])


def test_latency_command_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "lat.json"
    args = ["latency", "--backbone", "resnet8", "--size", "32", "--repeats", "1", "--warmup", "0",
            "--methods", "plain,lfi-light,gradcam", "--threads", "1", "--json", str(out)]  # fmt: skip
    result = runner.invoke(bench_app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert list(doc["ms"]) == ["plain", "lfi-light", "gradcam"]
    assert "speed-up vs gradcam" in result.output and "lfi-light" in result.output
    bad = runner.invoke(bench_app, ["latency", "--json", str(tmp_path / "missing" / "x.json")])
    assert isinstance(bad.exception, ConfigError) and "does not exist" in str(bad.exception)


AGREEING = ("pointing_game", "energy_pointing_game", "iou", "deletion_curve", "spearman", "confidence_change",
            "increase_in_confidence", "road_morf", "road_lerf")  # fmt: skip


@pytest.fixture(scope="module")
def agreement() -> dict[str, Any]:
    return metric_agreement(n=4, size=32, repeats=1, warmup=0, threads=1)


NO_PEER = ("insertion_curve", "average_drop")
FORWARD_BOUND = {"deletion_curve": 17, "insertion_curve": 17, "cascading_randomization": None, "average_drop": 2,
                 "confidence_change": 2, "increase_in_confidence": 2, "road_morf": 9, "road_lerf": 9}  # fmt: skip


def test_metric_agreement_structure_and_values(agreement: dict[str, Any]) -> None:
    json.dumps(agreement)
    rows = agreement["metrics"]
    assert set(rows) == {*AGREEING, *NO_PEER, "cascading_randomization"}
    for name, r in rows.items():
        assert r["selfcam_s"] > 0 and r["note"]
        if name in NO_PEER:
            assert r["peer"] is None and "peer_s" not in r
            continue
        assert r["peer"] == ("grad-cam" if name in ("confidence_change", "increase_in_confidence", "road_morf",
                                                    "road_lerf") else "quantus")  # fmt: skip
        assert r["peer_s"] > 0
        assert r["speedup"] == pytest.approx(r["peer_s"] / r["selfcam_s"])
    for name, r in rows.items():  # the forward-bound metrics carry their floor, the others none
        assert ("floor_s" in r) == (name in FORWARD_BOUND), name
        if name in FORWARD_BOUND:
            assert r["floor_s"] > 0 and r["x_floor"] == pytest.approx(r["selfcam_s"] / r["floor_s"])
            passes = FORWARD_BOUND[name]
            assert passes is None or r["floor_forwards"].startswith(f"{passes} x 4 images")
            assert agreement["goals"][f"{name} <= 1.2x its forward floor"] == (r["x_floor"] <= 1.2)
    assert rows["cascading_randomization"]["floor_forwards"].endswith("one batch of the images per pass")
    for name, r in rows.items():  # ROAD and cascading randomization also carry their work floor
        assert ("work_floor_s" in r) == (name in ("road_morf", "road_lerf", "cascading_randomization")), name
        if "work_floor_s" in r:
            assert r["work_floor_s"] > 0 and r["x_work_floor"] == pytest.approx(r["selfcam_s"] / r["work_floor_s"])
    assert rows["road_morf"]["work_floor"].endswith("solve of the 36 systems")  # 9 percentiles x 4 images x 1 channel
    layers = len(rows["cascading_randomization"]["per_layer_max_abs_diff"])
    assert rows["cascading_randomization"]["work_floor"].startswith(f"{layers + 1} explain calls")
    assert rows["pointing_game"]["max_abs_diff"] == 0.0
    for name in AGREEING:  # same definitions: same numbers
        assert rows[name]["max_abs_diff"] <= 1e-4, (name, rows[name])
    mprt = rows["cascading_randomization"]  # only the RNG streams differ: the first reset (fc) is seeded alike
    assert len(mprt["per_layer_max_abs_diff"]) >= 10 and mprt["per_layer_max_abs_diff"][0] <= 1e-4
    assert mprt["layers_within_tolerance"] >= 1
    assert agreement["goals"]["pointing_game within 0.0001 of quantus"] is True


def test_floor_runs_the_passes_as_stacked_or_sequential_forwards(monkeypatch: pytest.MonkeyPatch) -> None:
    from selfcam import metrics

    seen: list[int] = []
    x = torch.zeros(4, 1, 8, 8)
    bench._floor_fn(lambda t: seen.append(len(t)), x, 5, sequential=False)()
    assert seen == [20]  # one stacked forward: 5 copies of the 4 images
    seen.clear()
    bench._floor_fn(lambda t: seen.append(len(t)), x, 5, sequential=True)()
    assert seen == [4] * 5
    seen.clear()
    monkeypatch.setattr(metrics, "FORWARD_ELEMENTS", 2 * x.numel())  # at most 2 copies per call
    bench._floor_fn(lambda t: seen.append(len(t)), x, 5, sequential=False)()
    assert seen == [8, 8, 4]


def test_batched_metric_forwards_give_the_per_step_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacking the perturbed copies into large forwards changes the call count, not the values."""
    from selfcam import create_model, metrics

    torch.manual_seed(0)
    model = create_model("plain", "resnet8", 3, 1).eval()
    x, maps, t = torch.randn(3, 1, 16, 16), torch.rand(3, 16, 16), torch.tensor([0, 1, 2])
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))

    def every() -> list[torch.Tensor]:
        return [metrics.deletion_curve(model, x, maps, t, 8), metrics.insertion_curve(model, x, maps, t, 8),
                metrics.average_drop(model, x, maps, t), metrics.road(model, x, maps, t, (10, 50, 90), noise=0.0)]

    batched = every()
    assert calls == [27, 27, 6, 9]
    calls.clear()
    monkeypatch.setattr(metrics, "FORWARD_ELEMENTS", 1)  # one copy per forward, as before the batching
    single = every()
    assert calls == [3] * (9 + 9 + 2 + 3)
    for a, b in zip(batched, single):
        assert torch.allclose(a, b, atol=1e-6)


def test_max_abs_diff_by_hand() -> None:
    nan = float("nan")
    assert bench._max_abs_diff([1.0, nan, 3.0], torch.tensor([1.5, nan, 2.0])) == 1.0
    assert bench._max_abs_diff([nan], [0.0]) == math.inf
    with pytest.raises(ConfigError, match="shapes"):
        bench._max_abs_diff([1.0], [1.0, 2.0])


def test_tie_free_keeps_the_order_and_breaks_ties_row_major() -> None:
    maps = torch.tensor([[[0.0, 0.5], [0.0, 1.0]]])
    out = bench._tie_free(maps, weight=0.1)
    # ranks (stable, ascending): 0 -> 0, 0.5 -> 2, second 0 -> 1, 1.0 -> 3
    expected = 0.9 * maps + 0.1 * torch.tensor([[[0.0, 2.0], [1.0, 3.0]]]) / 3
    assert torch.allclose(out, expected)
    assert bench._divisor_steps(1024) == 16 and bench._divisor_steps(49 * 49) == 7


def test_metrics_command_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    result = runner.invoke(bench_app, ["metrics", "--n", "2", "--size", "32", "--repeats", "1", "--threads", "1",
                                       "--metrics", "pointing_game,iou", "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert set(doc["metrics"]) == {"pointing_game", "iou"} and doc["n"] == 2
    assert "speed-up" in result.output
    bad = runner.invoke(bench_app, ["metrics", "--metrics", "nope", "--json", str(out)])
    assert isinstance(bad.exception, ConfigError) and "nope" in str(bad.exception)


def test_train_throughput_document_on_a_tiny_run() -> None:
    doc = bench.train_throughput("plain", n=64, size=16, batch_size=32, epochs=2, repeats=1,
                                 datasets="cluttered-digits,idx,imagefolder", threads=1, options="bf16")  # fmt: skip
    json.dumps(doc)
    o = doc["options"]["bf16"]  # fit plain with precision="bf16-mixed", against fit plain as it is
    assert set(doc["options"]) == {"bf16"} and o["config"] == {"precision": "bf16-mixed"}
    assert o["vs_default"] == pytest.approx(o["fit_img_s"] / doc["methods"]["plain"]["fit_img_s"])
    assert o["fit_img_s"] == doc["samples"]["fit plain bf16"][0]
    r = doc["methods"]["plain"]
    assert set(doc["methods"]) == {"plain"} and r["fit_img_s"] > 0 and r["raw_img_s"] > 0
    assert r["ratio"] == pytest.approx(r["fit_img_s"] / r["raw_img_s"])
    assert doc["goals"]["fit plain >= 0.9x raw"] == (r["ratio"] >= 0.9)
    assert {k: v["storage"] for k, v in doc["data"].items()} == {"cluttered-digits": "ClutteredDigits",
                                                                  "idx": "ArrayImages", "imagefolder": "FileImages"}
    for k, v in doc["data"].items():
        assert v["ratio"] == pytest.approx(v["feed_img_s"] / v["consume_img_s"])
        assert v["consume_img_s"] == doc["samples"]["raw plain, 3 channels" if v["in_chans"] == 3 else "raw plain"][0]
    with pytest.raises(ConfigError, match="epochs"):
        bench.train_throughput("plain", epochs=1)
    with pytest.raises(ConfigError, match="--options: unknown name"):
        bench.train_throughput("plain", options="fp8")
    with pytest.raises(ConfigError, match="clock must be"):
        bench.train_throughput("plain", clock="sundial")


def test_train_throughput_on_the_cpu_clock() -> None:
    """clock="cpu": images/s over the CPU seconds of the epochs after the first (a call of E epochs less one of 1)."""
    doc = bench.train_throughput("plain", n=64, size=16, batch_size=32, epochs=3, repeats=1, datasets="", options="",
                                 threads=1, clock="cpu")  # fmt: skip
    r = doc["methods"]["plain"]
    assert doc["clock"] == "cpu" and doc["options"] == {} and doc["data"] == {}
    assert 0 < r["fit_img_s"] < 1e6 and 0 < r["raw_img_s"] < 1e6 and r["ratio"] == pytest.approx(r["fit_img_s"] / r["raw_img_s"])
    assert "over their CPU seconds" in bench._md_train(doc)[0]


def test_cpu_seconds_count_the_work_of_the_call() -> None:
    spin = lambda e: sum(i * i for i in range(200_000 * e))  # noqa: E731
    assert bench._cpu_seconds(spin, 4) > 2 * bench._cpu_seconds(spin, 1) > 0


def test_raw_loop_trains_the_model() -> None:
    from selfcam import create_model

    torch.manual_seed(0)
    model = create_model("plain", "resnet8", 2, 1)
    before = [p.detach().clone() for p in model.parameters()]
    seconds = bench._raw_epochs(model, torch.randn(10, 1, 16, 16), torch.tensor([0, 1] * 5), 4, 2, 1e-2, 0.0, 0)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_memory_ratio_bookkeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_peak(args: list[str]) -> float:
        seen.append(args)
        n = int(args[args.index("--n") + 1])
        return 500.0 + (n / 10 if "cluttered-digits" in args else 0.0)

    monkeypatch.setattr(bench, "peak_memory_of", fake_peak)
    doc = bench.evaluate_memory(small=100, large=1000, repeats=2)
    assert doc["data"]["cluttered-digits"]["ratio"] == pytest.approx(600 / 510)
    assert doc["data"]["idx"]["ratio"] == 1.0 and doc["data"]["idx"]["metrics"] == "average_drop"
    assert len(seen) == 8 and all(a[0] == "evaluate" and "--out" in a for a in seen)
    assert list(doc["goals"].values()) == [False, True]


def test_peak_memory_of_a_real_process_and_a_failing_one() -> None:
    assert 20 < bench.peak_memory_of(["--help"]) < 4000
    with pytest.raises(ConfigError, match="failed"):
        bench.peak_memory_of(["info", "/no/such/run"])


def test_render_writes_between_the_markers_only(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    startup = {"repeats": 5, "python": "3.11", "torch": "2", "seconds": {'python -c "import torch"': 2.0, "selfcam --help": 2.2},
               "ratio": {'python -c "import torch"': 1.0, "selfcam --help": 1.1}, "heavy_modules": {"selfcam --help": []},
               "goals": {"selfcam --help <= 1.2x import torch": True}}  # fmt: skip
    (results / "startup.json").write_text(json.dumps(startup))
    doc = tmp_path / "b.md"
    doc.write_text("intro\n<!-- bench:startup -->\nold\n<!-- /bench:startup -->\n<!-- bench:train -->\nkept\n<!-- /bench:train -->\nend\n")
    assert bench.render_docs(results, doc) == ["startup"]
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- bench:train -->\nkept\n<!-- /bench:train -->\nend\n")
    assert "old" not in text and "| `selfcam --help` | 2.20 | 1.10 | - |" in text
    assert "- met: selfcam --help <= 1.2x import torch" in text and bench.BENCH_COMMANDS["startup"] in text
    assert bench.render_docs(results, doc) == ["startup"] and doc.read_text() == text  # idempotent
