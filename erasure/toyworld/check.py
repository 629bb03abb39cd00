"""Quality gates of the toy world: ``python -m erasure.toyworld.check`` (the gates: :mod:`erasure.toyworld.quality`).

Ends with one JSON line (``shape_accuracy``/``color_accuracy`` at guidance 7.5 and the rest).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .quality import HERE, run_check


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Quality gates of the toy world (ends with one JSON line).")
    ap.add_argument("--model", type=Path, default=HERE / "model")
    ap.add_argument("--clip", type=Path, default=HERE / "clip")
    ap.add_argument("--detector", type=Path, default=HERE / "detector.safetensors")
    ap.add_argument("--per-combo", type=int, default=10, help="images per shape x colour prompt and guidance")
    ap.add_argument("--no-fid", action="store_true", help="skip FID/KID (the Inception pass is the slow part)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = run_check(args.model, args.clip, args.detector, per_combo=args.per_combo, fid=not args.no_fid)
    print(json.dumps(result, sort_keys=True))  # the one machine-readable line


if __name__ == "__main__":
    main()
