"""Generate labelled images for learning similarity: python scripts/make_synthetic_identities.py --out DIR."""
import argparse
import sys
import time

from clip4cir.synthetic import make_synthetic_identities


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to write (a sub-folder per identity, labels.csv)")
    parser.add_argument("--identities", type=int, default=300)
    parser.add_argument("--views", type=int, default=8, help="photos of each identity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes that draw images")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = make_synthetic_identities(args.out, args.identities, args.views, args.seed, args.workers)
    print(f"wrote {counts['images']:,} images of {counts['identities']:,} identities to {args.out} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
