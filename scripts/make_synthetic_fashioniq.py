"""Generate a synthetic catalog in FashionIQ's exact layout: python scripts/make_synthetic_fashioniq.py --out DIR."""
import argparse
import sys
import time

from clip4cir.synthetic import SIZES, make_synthetic_fashioniq


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to write (captions/, image_splits/, images/)")
    parser.add_argument("--size", choices=list(SIZES), default="tiny",
                        help="tiny: seconds, for tests; demo: a few thousand images; full: FashionIQ's split sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes that draw images")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = make_synthetic_fashioniq(args.out, args.size, args.seed, args.workers)
    images = sum(c["images"] for c in counts.values())
    triplets = sum(c["triplets"] for c in counts.values())
    print(f"wrote {triplets:,} triplets and {images:,} split entries to {args.out} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
