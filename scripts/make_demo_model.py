"""Make the offline demo's model: generate the `demo` synthetic catalog, fine-tune cir-tiny (stage one), train a
Combiner (stage two), and write demo/encoder.safetensors, demo/combiner.safetensors and demo/metrics.json.

    python scripts/make_demo_model.py --work /tmp/demo-work --out demo
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

from clip4cir.artifacts import atomic_write, atomic_write_text
from clip4cir.encoder_file import load_encoder
from clip4cir.evaluation import rank_category, summarize
from clip4cir.fusion import combine_sum, load_combiner
from clip4cir.service import DEMO_SEED
from clip4cir.synthetic import make_synthetic_fashioniq
from clip4cir.train import main as train_clip
from combiner.train import main as train_combiner


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder (catalog, runs)")
    parser.add_argument("--out", default="demo", help="where the demo checkpoints go")
    parser.add_argument("--epochs", type=int, default=40, help="stage-one epochs")
    parser.add_argument("--combiner-epochs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    data = work / "fiq-demo"
    if not (data / "captions").is_dir():
        make_synthetic_fashioniq(data, "demo", seed=DEMO_SEED)
    common = ["--data", str(data), "--workers", str(args.workers), "--quiet", "--save-best"]
    train_clip(common + ["--model", "cir-tiny", "--output", str(work / "stage1"), "--epochs", str(args.epochs),
                         "--batch-size", "64", "--lr", "5e-4"])
    encoder_path = work / "stage1" / "best.safetensors"
    train_combiner(common + ["--clip-checkpoint", str(encoder_path), "--output", str(work / "stage2"),
                             "--epochs", str(args.combiner_epochs), "--batch-size", "256", "--lr", "1e-3",
                             "--val-every", "5"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "encoder.safetensors", lambda tmp: shutil.copyfile(encoder_path, tmp))
    atomic_write(out / "combiner.safetensors", lambda tmp: shutil.copyfile(work / "stage2" / "best.safetensors", tmp))
    encoder = load_encoder(out / "encoder.safetensors")
    combiner, _ = load_combiner(out / "combiner.safetensors", encoder=encoder)
    metrics = {name: summarize([rank_category(encoder, data, c, combine, progress=False)
                                for c in ("dress", "shirt", "toptee")])
               for name, combine in (("sum", combine_sum), ("combiner", combiner.combine))}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    print(json.dumps({k: v["average"] for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
