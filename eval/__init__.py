"""Evaluation: image generation, the metric registry, one renderer, and experiments as configs.

Library (raises :class:`erasure.errors.UserError`, sets up no logging, reads no command line):

- :mod:`eval.prompts`    prompt sets (ESD-style CSVs, COCO caption JSON, config lists), cut to N rows
- :mod:`eval.reference`  real-image folders (user COCO folder; toy-world renders; scikit-image photos)
- :mod:`eval.cache`      the image cache: one seeded, batched, resumable generator (sharded with accelerate), Inception features
- :mod:`eval.metrics`    the metric registry: every metric a table or plot shows, with direction, label, format, tables
- :mod:`eval.evaluation` ``Evaluation`` of one system (run, base model, reference) and its ``eval.json``
- :mod:`eval.tables`     what each table holds: Table 1, Table 1 over seeds, the sweep summary, the frontier
- :mod:`eval.render`     the one table renderer (markdown, CSV, LaTeX; arrows, formats, bold/underline from the registry)
- :mod:`eval.plots`      every figure (sweep, frontier, timelines, erasure curves)
- :mod:`eval.config`     eval configs from overrides: ``conf/eval/run.yaml`` and the experiments ``conf/experiment/``
- :mod:`eval.experiment` the one orchestration: training jobs (one command builder), evaluation, reports

Entry points (argument parsing, logging set-up, one call into the library; nothing imports them):
``python -m eval.run`` (one system), ``eval.generate`` (one prompt set's images), ``eval.report`` (Table 1 from
eval.json files), ``eval.table1`` and ``eval.results`` (the experiments ``conf/experiment/{table1,results}.yaml``),
``eval.sweep`` (``conf/experiment/sweep.yaml``), ``eval.figures``.

Settings live in ``conf/eval/`` (``run.yaml``, ``suite/<model>.yaml``) and ``conf/experiment/``.
"""
