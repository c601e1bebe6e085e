"""Search an index from the command line (``clip4cir search``): a reference and a caption
make a composed search, a reference alone an image search, a caption alone a text search."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict

from clip4cir.commands.common import whole
from clip4cir.core.errors import SearchError
from clip4cir.retrieval.search import MAX_K, MODES, SearchEngine
from clip4cir.retrieval.threads import configure_serving_threads


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip4cir search", description=__doc__)
    parser.add_argument("--index", required=True, help="index folder made by build_index.py")
    parser.add_argument("--clip-checkpoint", help="where the index's encoder checkpoint lives now, if moved")
    parser.add_argument("--combiner", help="stage-two checkpoint for --mode combiner")
    parser.add_argument("--reranker", help="re-rank the first candidates of composed queries (clip4cir train-reranker)")
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument("--image", help="reference / query image file")
    reference.add_argument("--ref-id", help="id of a catalog item as the reference")
    parser.add_argument("--caption")
    parser.add_argument("--k", type=whole(1, MAX_K), default=10)
    parser.add_argument("--category", help="a category of the catalog, all, or auto")
    parser.add_argument("--mode", choices=MODES, help="combining function (default: combiner if loaded, else sum)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {id, score, category, path}")
    args = parser.parse_args(argv)
    configure_serving_threads()
    engine = SearchEngine.load(args.index, args.clip_checkpoint, args.combiner, args.device,
                               reranker_path=args.reranker)
    if args.caption is not None and (args.image or args.ref_id):
        mode = args.mode or ("combiner" if engine.combiner is not None else "sum")
        result = engine.composed_search(args.caption, args.image, args.ref_id, args.k, args.category, mode)
    elif args.image or args.ref_id:
        result = engine.image_search(args.image, args.k, args.category, args.ref_id)
    elif args.caption is not None:
        result = engine.text_search(args.caption, args.k, args.category)
    else:
        raise SearchError("give --image or --ref-id, --caption, or both")
    if args.json:
        print(json.dumps([asdict(h) for h in result.hits], indent=1))
    else:
        for note in result.notes:
            print(f"note: {note}")
        for rank, hit in enumerate(result.hits, 1):
            print(f"{rank:>4}  {hit.score:8.4f}  {hit.id}  {','.join(hit.categories) or '-'}  {hit.path}")
    return 0
