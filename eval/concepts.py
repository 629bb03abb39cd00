"""Evidence across concepts (issue 19): ``python -m eval.concepts [concepts=[...]] [methods=[...]] [out=...]``.

The experiment ``conf/experiment/concepts.yaml``: every registered method at its default on every concept of the toy
world, whose configs one rule writes (``conf/concept/toy/``, :mod:`erasure.toyworld.concepts`; checked here to be up
to date before anything trains), one seed each. Training goes through the experiments' one path
(:func:`eval.experiment.train_job`, :func:`eval.experiment.run_training`: ``jobs`` subprocesses at a time, finished
runs reused); each run's own probe (``summary.json``: the concept's target and preserved prompts, the same seeds for
every method) gives the numbers, which :mod:`eval.concept_tables` tabulates and plots into ``<out>/concepts.md``.
``make concepts`` drives it, ``make concepts-smoke`` runs it at tiny sizes.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time

from omegaconf import OmegaConf

from erasure.cli import setup_logging
from erasure.errors import UserError, exit_on_user_error
from erasure.io import write_text_atomic

from .config import compose
from .experiment import chosen_methods, machine, needs_training, run_training, train_job
from .prompts import resolve_path

log = logging.getLogger(__name__)


def chosen_concepts(cfg) -> list[str]:
    """``concepts`` (null = every concept of the world), each checked; the generated files checked to be what the
    rule makes (a stale or hand-edited file would make the table answer another question)."""
    from erasure.toyworld import concepts as toy

    if str(cfg.model) != "toyworld":
        raise UserError(f"the concepts experiment runs on the toy world, whose probe judges every concept: model=toyworld, "
                        f"got model={cfg.model}")
    every = toy.names()
    chosen = [str(c) for c in cfg.concepts] if cfg.concepts else every
    unknown = [c for c in chosen if c not in every]
    if unknown:
        raise UserError(f"unknown concept(s) {', '.join(unknown)}: choose from {', '.join(every)}")
    stale = toy.write(toy.ROOT / toy.OUT, toy.ROOT / toy.MACE_OUT, check=True)
    if stale:
        raise UserError(f"{len(stale)} generated concept file(s) differ from the rule ({stale[0]}): run "
                        "python -m erasure.toyworld.write_concepts")
    return chosen


def _with_concept(cfg, concept: str):
    """The experiment config with ``concept`` set, as train_job reads it (``concept=toy/<name>``)."""
    node = OmegaConf.to_container(cfg, resolve=False)
    node["concept"] = f"toy/{concept}"
    return OmegaConf.create(node)


def run(cfg, command: str) -> dict:
    start = time.perf_counter()
    out = resolve_path(cfg.out)
    concepts = chosen_concepts(cfg)
    methods = chosen_methods(cfg)
    jobs = [train_job(_with_concept(cfg, c), m, out / "runs" / c / m, f"{m} on {c}",
                      [f"trainer.seed={int(cfg.seed)}"]) for c in concepts for m in methods]
    missing = {}
    if not cfg.train:
        missing = {j.name: f"{j.name} (not trained: train=false)" for j in jobs if needs_training(j, True)}
    t0 = time.perf_counter()
    times, failed = run_training([j for j in jobs if j.name not in missing], max(1, int(cfg.jobs or 1)), bool(cfg.reuse))
    failed.update(missing)
    training_s = time.perf_counter() - t0
    from . import concept_tables  # after training: its report needs only the finished runs

    data = concept_tables.collect(out / "runs", concepts, methods)
    meta = dict(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine(),
                torch_threads=os.environ.get("OMP_NUM_THREADS"), concepts=concepts, methods=methods,
                seed=int(cfg.seed), training_s=round(training_s, 1), trained=times, failed=failed,
                total_s=round(time.perf_counter() - start, 1))
    write_text_atomic(out / "concepts_meta.json", json.dumps(meta, indent=2) + "\n")
    title = (f"Across concepts: {len(methods)} methods x {len(concepts)} toy-world concepts (seed {int(cfg.seed)}; "
             f"`{command}`, {meta['date'][:10]})")
    md = concept_tables.report(data, out, title)
    if failed:
        log.error("%d run(s) missing: %s", len(failed), "; ".join(failed.values()))
    log.info("concepts done in %.0f s (training %.0f s) -> %s/concepts.md", meta["total_s"], training_s, out)
    return dict(markdown=md, data=data, meta=meta)


@exit_on_user_error
def main(argv: list[str]) -> dict:
    setup_logging()
    result = run(compose("experiment/concepts", argv), command=" ".join(["python -m eval.concepts", *argv]))
    print(result["markdown"], end="")
    if result["meta"]["failed"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
