import json

from clip4cir.benchmark import main as benchmark_main
from combiner.benchmark import bench_stage_two


def test_smallest_benchmark_configuration_runs_and_reports(tmp_path, real_annotations):
    out = tmp_path / "bench"
    assert benchmark_main(["--config", "smoke", "--out", str(out), "--annotations", str(real_annotations),
                           "--workers", "0"], stage_two=bench_stage_two) == 0
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    assert report["machine"]["cores"] >= 1 and "torch" in report["machine"]["versions"]
    assert results["extraction"][0]["images_per_s"] > 0
    assert 0 <= results["stage_one"][0]["data_wait_share"] <= 1
    assert results["stage_two"][0]["cached_epoch_s"] > 0 and results["stage_two"][0]["speedup"] > 0
    assert results["evaluation"]["galleries"] == [3817, 6346, 5373]
    latency = results["latency"][0]
    assert set(latency["python"]) >= {"composed_gallery_ref", "composed_upload", "image", "text"}
    assert set(latency["http"]) == {"composed_gallery_ref", "composed_upload", "image", "text"}
    assert {r["kind"] for r in results["scale"]} == {"flat", "ivf", "hnsw"}
    assert all(0 <= r["recall@10"] <= 1 for r in results["scale"])
    table = (out / "report.md").read_text()
    assert "| evaluation ranking |" in table and "peak RSS" in table
