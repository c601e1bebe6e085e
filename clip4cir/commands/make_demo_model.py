"""Make the offline demo's model (``clip4cir make-demo-model``): generate the `demo` synthetic catalog, fine-tune
the pretrained base (``demo/base``: cir-tiny trained on image-text pairs, clip4cir make-base-model) with stage
one (stored in half precision: every file of the demo stays under the 10 MB a Hugging Face Space takes without
Git LFS), train a Combiner (stage two) and a zero-shot φ (pic2word) for that encoder, and write
``demo/encoder.safetensors``, ``demo/combiner.safetensors``, ``demo/phi.safetensors``, ``demo/metrics.json``,
and the app's catalog ``demo/catalog`` (the validation split, drawn larger) with its index ``demo/index``.

    python -m clip4cir make-demo-model --work ~/demo-work --out demo
    python -m clip4cir make-demo-model --work ~/demo-work --stage-one demo/encoder.safetensors   # keep the encoder
"""
from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from clip4cir.commands.common import POSITIVE, WORKERS, whole
from clip4cir.core.artifacts import atomic_write, atomic_write_text, is_artifact, write_folder
from clip4cir.data.sources import SourceOptions, open_source
from clip4cir.data.synthetic import SYNTHETIC_FORMAT, make_synthetic_fashioniq
from clip4cir.evaluation.composed import evaluate
from clip4cir.models.combiner import combining_function, load_combiner
from clip4cir.models.encoder_file import load_encoder, save_encoder
from clip4cir.models.feature_sum import combine_sum
from clip4cir.serving.demo import DEMO_DIR, DEMO_SEED, write_demo_catalog
from clip4cir.training.stage_one import StageOneConfig, StageOneTask
from clip4cir.training.textual_inversion import PhiConfig, PhiTask
from clip4cir.training.trainer import train_here
from combiner.stage_two import StageTwoConfig, StageTwoTask


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip4cir make-demo-model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder (catalog, runs)")
    parser.add_argument("--out", default="demo", help="where the demo checkpoints go")
    parser.add_argument("--base", default=str(DEMO_DIR / "base" / "encoder.safetensors"),
                        help="the encoder stage one starts from")
    parser.add_argument("--epochs", type=whole(1), default=40, help="stage-one epochs")
    parser.add_argument("--lr", type=POSITIVE, default=1e-4, help="stage one's learning rate")
    parser.add_argument("--stage-one", help="an encoder to use instead of training stage one (e.g. the shipped "
                                            "demo/encoder.safetensors, to make the rest again)")
    parser.add_argument("--combiner-epochs", type=whole(1), default=100)
    parser.add_argument("--phi-epochs", type=whole(1), default=PhiConfig.epochs)
    parser.add_argument("--workers", type=WORKERS, default=2)
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    data = work / "fiq-demo"
    if not is_artifact(data, SYNTHETIC_FORMAT):
        write_folder(data, SYNTHETIC_FORMAT, lambda tmp: make_synthetic_fashioniq(tmp, "demo", seed=DEMO_SEED),
                     {"size": "demo", "seed": DEMO_SEED})
    source = SourceOptions(str(data))
    if args.stage_one:
        trained = Path(args.stage_one)
    else:
        stage_one = StageOneConfig(source=source, output=str(work / "stage1"), clip_checkpoint=args.base,
                                   epochs=args.epochs, batch_size=64, lr=args.lr, workers=args.workers, quiet=True,
                                   save_best=True)
        train_here(StageOneTask, stage_one)
        trained = work / "stage1" / "best.safetensors"
    encoder_path = work / "encoder-half.safetensors"  # what ships: stage two and φ learn from exactly it
    save_encoder(load_encoder(trained, record_path=False), encoder_path, half=True)
    stage_two = StageTwoConfig(source=source, output=str(work / "stage2"), clip_checkpoint=str(encoder_path),
                               epochs=args.combiner_epochs, batch_size=256, lr=1e-3, val_every=5,
                               workers=args.workers, quiet=True, save_best=True)
    train_here(StageTwoTask, stage_two)
    train_here(PhiTask, PhiConfig(source=source, output=str(work / "phi"), clip_checkpoint=str(encoder_path),
                                  method="pic2word", epochs=args.phi_epochs, workers=args.workers, quiet=True,
                                  save_best=True))
    out.mkdir(parents=True, exist_ok=True)
    for name, made in (("encoder", encoder_path), ("combiner", work / "stage2" / "best.safetensors"),
                       ("phi", work / "phi" / "best.safetensors")):
        atomic_write(out / f"{name}.safetensors", lambda tmp, made=made: shutil.copyfile(made, tmp))
    encoder = load_encoder(out / "encoder.safetensors")
    combiner, _ = load_combiner(out / "combiner.safetensors", encoder=encoder)
    phi = combining_function(encoder, None, "phi", str(out / "phi.safetensors"))
    metrics = {name: evaluate(encoder, open_source(data), combine=combine, progress=False)
               for name, combine in (("sum", combine_sum), ("combiner", combiner.combine), ("phi", phi))}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    write_demo_catalog(out, encoder, combiner.combine)
    print(json.dumps({k: v["average"] for k, v in metrics.items()}))
    return 0
