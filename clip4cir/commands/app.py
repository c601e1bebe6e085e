"""The app (``python app.py``, ``clip4cir serve``): composed, image and text search over a catalog in a Gradio
page, also the Hugging Face Spaces entry point.

    python app.py                      # offline demo: synthetic catalog + the small model in demo/
    python app.py --index INDEX [--combiner PATH] [--phi PATH] [--reranker PATH] [--share]
    python app.py --model RN50 --pretrained openai --data FOLDER

Every argument has an environment variable for Spaces: CLIP4CIR_INDEX, CLIP4CIR_CLIP_CHECKPOINT, CLIP4CIR_COMBINER,
CLIP4CIR_PHI, CLIP4CIR_RERANKER, CLIP4CIR_MODEL, CLIP4CIR_PRETRAINED, CLIP4CIR_DATA, CLIP4CIR_DATASET,
CLIP4CIR_SHARE, CLIP4CIR_HOST, CLIP4CIR_PORT.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from clip4cir.commands.common import whole
from clip4cir.data.sources import SourceOptions
from clip4cir.models.runtime import RUNTIMES
from clip4cir.serving.service import Options, cache_root, serving_engine
from clip4cir.serving.ui import serve


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="clip4cir serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default=env("CLIP4CIR_INDEX"), help="index folder (or hf://OWNER/REPO/PATH)")
    parser.add_argument("--clip-checkpoint", default=env("CLIP4CIR_CLIP_CHECKPOINT"), help="stage-one checkpoint")
    parser.add_argument("--combiner", default=env("CLIP4CIR_COMBINER"), help="stage-two checkpoint")
    parser.add_argument("--phi", default=env("CLIP4CIR_PHI"), help="a φ for zero-shot composed search (no triplets: "
                        "clip4cir train-phi)")
    parser.add_argument("--reranker", default=env("CLIP4CIR_RERANKER"), help="re-rank composed queries' first "
                        "candidates (clip4cir train-reranker)")
    parser.add_argument("--model", default=env("CLIP4CIR_MODEL"), help="open_clip model for zero-shot search")
    parser.add_argument("--pretrained", default=env("CLIP4CIR_PRETRAINED"), help="its pretrained tag, e.g. openai")
    parser.add_argument("--data", default=env("CLIP4CIR_DATA"),
                        help="data set or image folder to index: FashionIQ or CIRR root, triplets .jsonl/.csv, "
                             "image folder, datasets folder, hf://datasets/OWNER/NAME")
    parser.add_argument("--dataset", default=env("CLIP4CIR_DATASET", "auto"), help="what --data is (default: "
                        "recognised)")
    parser.add_argument("--device", default=env("CLIP4CIR_DEVICE", "auto"))
    parser.add_argument("--runtime", choices=RUNTIMES, default=env("CLIP4CIR_RUNTIME", "auto"),
                        help="how queries are encoded: torch, ONNX Runtime fp32 (onnx) or int8 (onnx-int8, kept "
                             "only when its top-10 lists agree with fp32's); auto: onnx on a CPU")
    parser.add_argument("--share", action="store_true", default=env("CLIP4CIR_SHARE", "") in ("1", "true", "True"),
                        help="also serve through a Gradio share link")
    parser.add_argument("--host", default=env("CLIP4CIR_HOST"), help="e.g. 0.0.0.0 to serve the network")
    parser.add_argument("--port", type=whole(1, 65_535), help="default: CLIP4CIR_PORT, else the first free from 7860")
    args = parser.parse_args(argv)
    if args.port is None and env("CLIP4CIR_PORT"):
        try:
            args.port = whole(1, 65_535)(env("CLIP4CIR_PORT"))
        except argparse.ArgumentTypeError as e:
            parser.error(f"CLIP4CIR_PORT: {e}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = Options(index=args.index, source=SourceOptions(args.data, args.dataset) if args.data else None,
                      model=args.model, pretrained=args.pretrained, clip_checkpoint=args.clip_checkpoint,
                      combiner=args.combiner, phi=args.phi, reranker=args.reranker, device=args.device,
                      runtime=args.runtime)
    try:
        engine = serving_engine(options)
    except ValueError as e:  # bad paths, models, indexes: one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        app = serve(engine, cache_root(options), args.host, args.port, args.share)
    except OSError as e:  # the port is taken (Gradio: "Cannot find empty port"), or the host cannot be bound
        where = f"port {args.port}" if args.port else "a free port from 7860"
        print(f"error: cannot serve on {where}{f' of {args.host}' if args.host else ''}: it is in use or cannot be "
              f"bound ({e.strerror or type(e).__name__}); choose another --port (or CLIP4CIR_PORT)", file=sys.stderr)
        return 2
    if args.share and not app.share_url:
        print("could not create a Gradio share link (no connection to the share server?); "
              f"the app keeps running locally at {app.local_url}", file=sys.stderr)
    app.block_thread()
    return 0
