"""Generate a synthetic catalog in CIRR's exact layout: python scripts/make_synthetic_cirr.py --out DIR."""
import argparse
import sys
import time

from clip4cir.synthetic import CIRR_SIZES, make_synthetic_cirr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to write (cirr/captions, cirr/image_splits, images)")
    parser.add_argument("--size", choices=list(CIRR_SIZES), default="tiny",
                        help="tiny: seconds, for tests; demo: about a thousand images; full: CIRR's split sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes that draw images")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = make_synthetic_cirr(args.out, args.size, args.seed, args.workers)
    print(", ".join(f"{split}: {c['triplets']:,} triplets over {c['images']:,} images" for split, c in counts.items())
          + f" -> {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
