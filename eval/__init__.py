"""Evaluation: image generation, metrics registry and Table-1 reports.

- :mod:`eval.prompts`   prompt sets (ESD-style CSVs, COCO caption JSON, config lists), cut to N rows
- :mod:`eval.generate`  one cached, seeded, batched generator for every metric (resumable)
- :mod:`eval.metrics`   the metrics registry: nudenet, concept_rate, fid, kid, clip, ssim, train_time, iterations
- :mod:`eval.reference` real-image folders (user COCO folder; toy-world renders; scikit-image photos)
- :mod:`eval.run`       ``python -m eval.run run=<run folder>`` -> eval.json
- :mod:`eval.report`    ``python -m eval.report <folders…>`` -> table1.{md,csv,tex}
- :mod:`eval.table1`    ``python -m eval.table1`` (``make table1`` / ``make table1-smoke``)

Settings live in ``conf/eval/`` (``run.yaml``, ``table1.yaml``, ``suite/<model>.yaml``).
"""
