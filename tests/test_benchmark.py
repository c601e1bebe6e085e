import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO
from PIL import Image
from scipy import stats

from clip4cir.benchmarks import ablation
from clip4cir.benchmarks.paired import paired_interval, query_sampling_se
from clip4cir.commands.benchmark import main as benchmark_main
from clip4cir.data.sources.fashioniq import CATEGORIES, load_image_split
from clip4cir.data.synthetic.fashioniq import SIZES


def test_pipeline_benchmark_measures_what_it_reports(tmp_path, real_annotations):
    out = tmp_path / "bench"
    assert benchmark_main(["--config", "smoke", "--out", str(out), "--annotations", str(real_annotations),
                           "--workers", "0"]) == 0
    report = json.loads((out / "report-smoke.json").read_text())
    results = report["results"]
    # the evaluation step ranks galleries of the real val sizes, read from the annotation files
    assert results["evaluation"]["galleries"] == [len(load_image_split(real_annotations, c, "val")) for c in CATEGORIES]
    # stage two: cached features and re-encoding every batch train the same model (same data, order, loss)
    stage_two = results["stage_two"][0]
    assert stage_two["cached_val_R@10"] == stage_two["reencode_val_R@10"]
    assert stage_two["reencode_epoch_s"] > stage_two["cached_epoch_s"]
    latency = results["latency"][0]
    for api in ("python", "http"):  # every timed query was answered, with the 10 results it asked for
        assert set(latency[api]) >= {"composed_gallery_ref", "composed_upload", "image", "text"}
        assert all(p["results"] == 10 for p in latency[api].values()), latency[api]
    table = (out / "report-smoke.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert len(rows) == len(results["extraction"]) + len(results["stage_one"]) + len(results["stage_two"]) + 1 + \
        sum(len(q[api]) for q in results["latency"] for api in ("python", "http"))


@pytest.mark.slow
def test_index_benchmark_can_fail(tmp_path):
    """On data that is not trivially clustered, with held-out queries and exact truth: exact search is exact,
    IVF with one probe is far from it, and the calibrated settings reach the target on other queries."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "index", "--config", "smoke",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "index-smoke.json").read_text())
    kinds = {k["kind"]: k for k in report["sets"][0]["kinds"]}
    assert kinds["flat"]["rows"][0]["recall"]["all"] == 1.0
    one_probe = next(r for r in kinds["ivf-sq8"]["rows"] if r["effort"] == 1)
    assert one_probe["recall"]["all"] < 0.5
    for kind in ("ivf-sq8", "ivf-pq", "hnsw"):
        calibrated = next(r for r in kinds[kind]["rows"] if r["effort"] is None)  # the calibrated settings
        assert calibrated["recall"]["all"] >= 0.93, (kind, calibrated)
        assert min(calibrated["recall"][c] for c in ("a", "b", "c")) >= 0.93
    with Image.open(tmp_path / "index-smoke-recall-latency.png") as plot:
        assert plot.width > 400
    assert "| ivf-pq |" in (tmp_path / "index-smoke.md").read_text()


@pytest.mark.slow
def test_labels_benchmark_reports_held_out_identities(tmp_path):
    """Every loss is judged on identities it never saw, beside the zero-shot encoder of the same seed."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "labels", "--config", "smoke",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "labels-smoke.json").read_text())
    assert set(report["sets"]) == {"easy", "hard"}  # each set trains its own runs
    for one in report["sets"].values():
        assert set(one["losses"]) == {"triplet-random", "supcon"} and one["test_identities"] >= 2
        assert report["default_loss"] in one["losses"]
        for row in one["losses"].values():
            assert row["runs"] == 1 and list(row["validation"]) == ["lr 0.001"]  # chosen from what validation tried
            assert row["MAP@R"]["values"] != one["zero_shot"]["MAP@R"]["values"]  # training changed the encoder
    assert "| zero-shot |" in (tmp_path / "labels-smoke.md").read_text()


@pytest.mark.slow
def test_ablation_reports_every_variant_paired_on_the_held_out_catalog(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "ablation", "--config", "smoke",
                             "--out", str(tmp_path), "--workers", "0"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "ablation-smoke.json").read_text())
    assert set(report["stage_one"]) == {name for name, _ in ablation.variants(1)} >= {"clip4cir", "plus",
                                                                                       "- caption augmentation"}
    assert "+ gallery negatives" in report["stage_two"] and report["seeds"] == ablation.CONFIGS["smoke"]["seeds"]
    assert report["test_seed"] != 0 and report["base"] == "demo/base/encoder.safetensors"
    for rows in (report["stage_one"], report["stage_two"], report["pipelines"]):
        for stats_ in rows.values():  # every variant paired with the baseline of its own seed
            diffs = np.subtract(stats_["average/R@10"]["values"], next(iter(rows.values()))["average/R@10"]["values"])
            assert stats_["paired"]["average/R@10"]["mean"] == pytest.approx(diffs.mean())
    train = sum(SIZES["tiny"][c]["train"][0] for c in CATEGORIES)  # every triplet each epoch, whole batches
    smoke = ablation.CONFIGS["smoke"]
    assert report["steps"] == {"stage_one": smoke["epochs"] * (train // smoke["batch"]),
                               "stage_two": smoke["combiner_epochs"] * (train // smoke["combiner_batch"])}
    assert "Δ avg R@10 [95% CI]" in (tmp_path / "ablation-smoke.md").read_text()


@pytest.mark.slow
def test_serving_benchmark_measures_every_runtime_api_and_load(tmp_path):
    """Every cell (runtime × API × query kind × clients) was answered with its k results (the benchmark checks
    each answer and stops otherwise)."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "serving", "--config", "smoke",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "serving-smoke.json").read_text())
    cells = {(r["runtime"], r["api"], r["query"], r["clients"]) for r in report["results"]}
    assert cells == {(rt, api, q, c) for rt in ("torch", "onnx") for api in ("engine", "json")
                     for q in ("composed_reference", "composed_upload", "text") for c in (1, 4)}
    # four clients at once get more answers a second than one (queries are batched, the cores shared)
    for runtime in ("torch", "onnx"):
        one, four = (next(r["qps"] for r in report["results"] if (r["runtime"], r["api"], r["query"],
                                                                  r["clients"]) == (runtime, "engine", "text", c))
                     for c in (1, 4))
        assert four > one, (runtime, one, four)


@pytest.mark.slow
def test_the_store_benchmark_measures_every_variant(tmp_path):
    """FAISS files and a real Milvus server of its own (here, not in test_milvus.py: two servers at once on two
    cores start too slowly)."""
    from clip4cir.benchmarks.store import VARIANTS, run_store
    report = run_store("smoke", tmp_path)
    assert [(r["store"], r["kind"]) for r in report["rows"]] == VARIANTS
    assert all(r["recall"] == 1.0 for r in report["rows"] if r["kind"] == "flat")  # exact, by either store
    assert all(r["recall"] >= 0.9 and r["qps"] > 0 for r in report["rows"])
    assert "| milvus | hnsw |" in (tmp_path / "store-smoke.md").read_text()


@pytest.mark.slow
def test_the_zero_shot_benchmark_reports_every_row_on_held_out_catalogs(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "zero-shot", "--config",
                             "smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "zero-shot-smoke.json").read_text())
    phi_rows = {f"{adapted}{method}{added}" for adapted in ("", "catalog adaptation + ")
                for method in ("pic2word", "lincir") for added in ("", " + Sum")}
    assert set(report["rows"]) == {"Sum, no training", "catalog adaptation, Sum", *phi_rows,
                                   "mined title triplets, stage one, Sum", "mined title triplets, stage one + Combiner",
                                   "supervised CLIP4Cir (stage one + Combiner)"}
    for method, choice in report["sum_weights"].items():  # chosen on the dev catalogs, among the weights tried
        assert choice["dev R@10"][f"{choice['chosen']:g}"] == max(choice["dev R@10"].values())
        assert report["rows"][f"{method} + Sum"] != report["rows"][method]  # the Sum changed the queries
    for row in report["rows"].values():
        assert {"fashioniq/R@10", "cirr/R@10", "circo/mAP@10"} <= set(row)
        assert all(0 <= s["mean"] <= 100 for s in row.values())
    assert all(seconds > 0 for seconds in report["phi_seconds"].values()) and report["query_cost"]["zero_shot_ms"] > 0
    assert report["query_cost"]["zero_shot_sum_ms"] > 0
    assert report["mining_seconds"] > 0 and all(int(n.replace(",", "")) > 0 for n in report["mined"].split(" / "))
    table = (tmp_path / "zero-shot-smoke.md").read_text()
    assert "| supervised CLIP4Cir (stage one + Combiner) | the catalog's |" in table and "| lincir | none |" in table
    assert "| mined title triplets, stage one, Sum | mined from titles |" in table


def test_the_paired_interval_is_the_t_interval_of_the_per_seed_differences():
    variant, baseline = [31.0, 33.5, 30.2, 34.1, 32.0], [30.0, 31.0, 30.5, 32.0, 30.9]
    got = paired_interval(variant, baseline)
    diffs = np.subtract(variant, baseline)
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    assert got["mean"] == pytest.approx(diffs.mean()) and (got["low"], got["high"]) == pytest.approx((low, high))
    wider = paired_interval(variant, baseline, query_se=stats.sem(diffs))  # a query sample as uncertain as seeds
    assert wider["high"] - wider["mean"] == pytest.approx(np.sqrt(2) * (high - diffs.mean()))
    assert paired_interval(baseline, baseline)["low"] == 0 == paired_interval(baseline, baseline)["high"]
    with pytest.raises(ValueError, match="same seeds, two or more"):
        paired_interval(variant, baseline[:3])
    with pytest.raises(ValueError, match="same seeds, two or more"):
        paired_interval(variant[:1], baseline[:1])


def test_the_query_bootstrap_gives_the_standard_error_of_a_mean_difference():
    rng = np.random.default_rng(0)
    baseline = [{c: rng.integers(0, 2, 900).tolist() for c in ("a", "b")} for _ in range(3)]
    assert query_sampling_se(baseline, baseline) == 0  # the same hits: no difference to resample
    variant = [{c: [1 - h for h in run[c]] for c in run} for run in baseline]
    diff = np.mean([[np.subtract(v[c], b[c]) for c in ("a", "b")]
                    for v, b in zip(variant, baseline, strict=True)], axis=0)
    analytic = 100 * np.sqrt(sum(d.var() / len(d) for d in diff)) / 2  # mean of two independent category means
    assert query_sampling_se(variant, baseline) == pytest.approx(analytic, rel=0.1)
    assert query_sampling_se(variant[:1] * 3, baseline[:1] * 3) > query_sampling_se(variant, baseline)  # seeds average


def test_the_clip_retrieval_targets_can_fail():
    from clip4cir.benchmarks import clip_retrieval

    def report(our_qps, our_p99, our_recall, our_seconds):
        cell = {"p50_ms": 5.0, "p99_ms": 20.0, "qps": 100.0}
        return {"images": 20_000, "build": {"theirs": {"encode_s": 100.0}, "ours": {"encode_index_s": our_seconds}},
                "recall_at_10": {"theirs": {"text": 1.0, "image": 0.99}, "ours": {"text": our_recall, "image": 1.0}},
                "serving": {"clip back /knn-service": {"1": cell, "8": cell, "16": cell},
                            "ours /knn-service": {"1": cell, "16": cell,
                                                  "8": {"p50_ms": 5.0, "p99_ms": our_p99, "qps": our_qps}}}}

    assert all(clip_retrieval.verdicts(report(250.0, 15.0, 1.0, 90.0)).values())
    missed = clip_retrieval.verdicts(report(150.0, 25.0, 0.9, 120.0))
    assert not any(missed.values()) and "≥ 2× clip back's queries/s at 8 clients" in missed


@pytest.mark.slow
def test_the_titles_and_reranking_benchmark_pairs_every_row_on_held_out_catalogs(tmp_path):
    from clip4cir.benchmarks.titles_reranking import COMBINER, SUPERVISED_ROWS, ZERO_SHOT, pair_of
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "titles-reranking", "--config",
                             "smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "titles-reranking-smoke.json").read_text())
    rows = set(SUPERVISED_ROWS) | set(ZERO_SHOT) | {f"{row}, with titles" for row in ZERO_SHOT}
    for catalog in ("fashioniq", "cirr"):
        table = report["tables"][catalog]
        assert set(table) == rows
        assert table[COMBINER]["paired"]["average/R@10"]["mean"] == 0  # the pair of itself
        for row, summary in table.items():
            paired = summary["paired"]["average/R@10"]
            own = summary["average/R@10"]["values"]
            other = table[pair_of(row)]["average/R@10"]["values"]
            assert paired["mean"] == pytest.approx(np.mean(np.subtract(own, other)))
            assert paired["low"] <= paired["mean"] <= paired["high"] and 0 <= summary["average/R@10"]["mean"] <= 100
    assert report["query_cost"]["caption_ms"] > 0 and report["query_cost"]["titled_ms"] > 0
    assert "| Combiner, trained with titles | " in (tmp_path / "titles-reranking-smoke.md").read_text()


def test_the_share_of_the_way_runs_from_the_untrained_sum_to_the_supervised_combiner():
    from clip4cir.benchmarks.titles_reranking import COMBINER, ZERO_SHOT, share_of_the_way

    def table(start, end, row):
        return {ZERO_SHOT[0]: {"average/R@10": {"mean": start}}, COMBINER: {"average/R@10": {"mean": end}},
                ZERO_SHOT[3]: {"average/R@10": {"mean": row}}}
    assert share_of_the_way(table(50.0, 80.0, 72.0), ZERO_SHOT[3]) == pytest.approx(22 / 30)
    assert share_of_the_way(table(50.0, 80.0, 50.0), ZERO_SHOT[0]) == 0
    assert share_of_the_way(table(50.0, 50.0, 60.0), ZERO_SHOT[3]) is None  # no way to go
