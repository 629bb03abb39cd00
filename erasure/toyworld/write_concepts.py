"""Write (or check) the toy world's generated concept configs and MACE data (the rule: :mod:`erasure.toyworld.concepts`).

    python -m erasure.toyworld.write_concepts [out=conf/concept/toy] [mace_out=data/mace/toyworld] [check=false]

``check=true`` writes nothing and exits 2 with one sentence when a file differs from what the rule makes.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..cli import parse_options, setup_logging
from ..errors import UserError, exit_on_user_error
from .concepts import MACE_OUT, OUT, ROOT, names, write

log = logging.getLogger("erasure.toyworld.write_concepts")
USAGE = "usage: python -m erasure.toyworld.write_concepts [out=conf/concept/toy] [mace_out=data/mace/toyworld] [check=false]"
OPTIONS = {"out", "mace_out", "check"}


@exit_on_user_error
def main(argv: list[str]) -> list[str]:
    setup_logging()
    args = parse_options(argv, OPTIONS, USAGE, lambda a: True)
    out, mace_out = (Path(str(args.get(k, d))) for k, d in (("out", OUT), ("mace_out", MACE_OUT)))
    out, mace_out = (p if p.is_absolute() else ROOT / p for p in (out, mace_out))
    check = str(args.get("check", "false")).lower() in ("1", "true", "yes")
    changed = write(out, mace_out, check)
    if check and changed:
        raise UserError(f"{len(changed)} generated file(s) differ from the rule ({', '.join(changed[:3])}"
                        f"{', ...' if len(changed) > 3 else ''}): run python -m erasure.toyworld.write_concepts")
    log.info("%s: %d concepts in %s%s", "checked" if check else "wrote", len(names()), out,
             f" ({len(changed)} file(s) written)" if not check else "")
    return changed


if __name__ == "__main__":
    main(sys.argv[1:])
