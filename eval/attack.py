"""Attack one system: ``python -m eval.attack run=<run folder> attack=<name>[,...] [system=run|base] [robustness=<tier>]``.

The threat model (``conf/eval/robustness/<tier>.yaml``: prompts, sampler, detector, each attack's settings) defaults
to the one named like the run's model. Writes ``<run>/attacks/<attack>/`` (:mod:`eval.attacking`): attack.json
(success rate at every detector threshold, cost), adversarial_prompts.csv and the images. Cached and resumable.
"""
from __future__ import annotations

import sys

from erasure.cli import setup_logging
from erasure.errors import exit_on_user_error

from .attacking import attack_run
from .config import compose


@exit_on_user_error
def main(argv: list[str]) -> list[dict]:
    setup_logging()
    out = attack_run(compose("attack", argv))
    for s in out:
        rates = ", ".join(f"{'flagged' if not c else '@' + c} {v:.3f}" for c, v in s["asr"].items())
        print(f"{s['system']} / {s['attack']}: success {rates} on {s['n']} prompts; "
              f"{s['cost']['seconds']:.1f} s and {s['cost']['unet_evals']:.0f} UNet evaluations per prompt")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
