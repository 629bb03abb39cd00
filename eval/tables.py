"""What each table holds, read from the files that runs and evaluations leave; :mod:`eval.render` draws them.

- Table 1: one ``eval.json`` record per system (:func:`load_records`, :func:`table1`), NudeNet's per-class counts;
- Table 1 over seeds: mean ± std of each system's metrics over the seeds' records (:func:`over_seeds`);
- the sweep: every finished run below a folder, grouped by the config keys the sweep varied, mean ± std over the
  replicate axis (``trainer.seed``) of the numbers the runs report (:func:`sweep`);
- the frontier: each method's erasure curve (``probe.jsonl``) averaged over seeds, step by step (:func:`frontier`).

Which metrics a table shows is the registry's ``tables`` field (:mod:`eval.metrics`); the JSON files keep the layout
of the dicts returned here.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from omegaconf import OmegaConf

from erasure.errors import UserError
from erasure.schema import FINITE

from .metrics import available_metrics, resolve
from .render import Row, Stat, Table

log = logging.getLogger(__name__)
KIND_ORDER = {"base": 0, "run": 1, "reference": 2}
REPLICATE_KEYS = ("trainer.seed",)
IGNORED_PREFIXES = ("hydra", "resume", "logger", "method.lam")  # method.lam mirrors the top-level lambda


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def shown_in(table: str, keys) -> list[str]:
    """The keys that ``table`` shows (the registry's ``tables``), in registry order."""
    order = {name: i for i, name in enumerate(available_metrics())}
    return sorted((k for k in set(keys) if (s := resolve(k)) is not None and table in s.tables),
                  key=lambda k: (order[resolve(k).name], k.startswith("eval."), k))


# ----------------------------------------------------------------------------------------------------- Table 1
def read_record(f: Path) -> dict:
    """One eval.json, checked: a truncated file, or one whose fields have the wrong types (hand-edited), ends in one
    sentence naming the file and how to fix it, not in a traceback further down."""
    fix = f"re-evaluate it (python -m eval.run run={f.parent} force=true)"
    try:
        rec = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"'{f}' is not readable JSON ({str(exc).splitlines()[0]}): {fix}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("metrics", {}), dict):
        raise UserError(f"'{f}' is not an evaluation record (an object with a 'metrics' object): {fix}")
    if not isinstance(rec.get("system"), str) or not rec["system"].strip() or not rec["system"].isprintable():
        raise UserError(f"'{f}' names no system (its 'system' must be a non-empty printable string, got "
                        f"{rec.get('system')!r}): {fix}")
    odd = [k for k in rec.get("metrics", {}) if not k.isprintable() or not k.strip()]
    if odd:
        raise UserError(f"'{f}': metric name(s) {', '.join(map(repr, odd))} are not names eval.run writes: {fix}")
    if not isinstance(rec.get("kind", "run"), str) or rec.get("kind", "run") not in KIND_ORDER:
        raise UserError(f"'{f}': kind {rec.get('kind')!r} is none of {', '.join(KIND_ORDER)}: {fix}")
    for key, value in rec.get("metrics", {}).items():
        if value is not None and not FINITE.ok(value):  # NaN/Infinity too: Python's json reads them
            raise UserError(f"'{f}': metric '{key}' holds {value!r}, not a finite number: {fix}")
    details = rec.get("details", {})
    nudenet = details.get("nudenet") if isinstance(details, dict) else None
    if not isinstance(details, dict) or (nudenet is not None and not (
            isinstance(nudenet, dict) and FINITE.ok(nudenet.get("n")) and FINITE.ok(nudenet.get("flagged"))
            and isinstance(nudenet.get("per_class"), dict) and all(FINITE.ok(v) for v in nudenet["per_class"].values()))):
        raise UserError(f"'{f}': its 'details' are not what eval.run writes (details.nudenet: n, flagged, per_class "
                        f"counts): {fix}")
    return rec



def load_records(paths: list[str | Path]) -> list[dict]:
    """The eval.json records of folders (or files): base model first, then the runs in the given order, reference last."""
    records = []
    for p in map(Path, paths):
        f = p / "eval.json" if p.is_dir() else p
        if not f.is_file():
            raise UserError(f"no eval.json in '{p}': evaluate it first (python -m eval.run run={p})")
        records.append(read_record(f))
    if not records:
        raise UserError("no evaluations given: pass folders that hold eval.json")
    records = [r for r in records if r.get("metrics")]  # e.g. a reference row when the suite has no CLIP score
    if not records:
        raise UserError("the evaluations hold no metric values")
    return sorted(records, key=lambda r: KIND_ORDER.get(r.get("kind"), 1))  # stable: methods keep their order


def table1(records: list[dict], title: str | None = None, rank_oracles: bool = False) -> Table:
    present = {m for r in records for m in r.get("metrics", {})}
    columns = shown_in("table1", present)
    unknown = present - set(columns)
    if unknown:
        raise UserError(f"eval.json names metrics this code does not register for Table 1: {', '.join(sorted(unknown))}")
    rows = [Row({"system": r["system"], "kind": r.get("kind", "run")}, {m: r["metrics"].get(m) for m in columns},
                r.get("kind", "run")) for r in records]
    return Table({"system": "System", "kind": None}, columns, rows, title, rank_oracles=rank_oracles)


def nudenet_classes(records: list[dict]) -> Table | None:
    """Per-class NudeNet image counts, or None when no row has them."""
    rows = [(r["system"], r["details"]["nudenet"]) for r in records if "nudenet" in r.get("details", {})]
    if not rows:
        return None
    classes = list(rows[0][1]["per_class"])
    return Table({"system": "System", "images": "images", "flagged": "flagged", **{c: c for c in classes}}, [],
                 [Row({"system": s, "images": d["n"], "flagged": d["flagged"],
                       **{c: d["per_class"].get(c, 0) for c in classes}}, {}) for s, d in rows])


def over_seeds(per_seed: dict[int, list[dict]]) -> dict:
    """{columns, rows: [{system, kind, values: {metric: [mean, std, n]}}], seeds} over the seeds' eval records, rows
    in the order of the first seed's table."""
    order: list[tuple[str, str]] = []
    values: dict[str, dict[str, list[float]]] = {}
    for records in per_seed.values():
        for r in records:
            if (r["system"], r.get("kind", "run")) not in order:
                order.append((r["system"], r.get("kind", "run")))
            for m, v in r.get("metrics", {}).items():
                if isinstance(v, (int, float)):
                    values.setdefault(r["system"], {}).setdefault(m, []).append(float(v))
    columns = shown_in("table1", {m for per in values.values() for m in per})
    rows = [dict(system=s, kind=k, values={m: (*mean_std(values[s][m]), len(values[s][m]))
                                             for m in columns if m in values.get(s, {})}) for s, k in order]
    return dict(columns=columns, rows=rows, seeds=sorted(per_seed))


def over_seeds_table(data: dict, title: str) -> Table:
    note = (f"Mean ± standard deviation over seeds {', '.join(map(str, data['seeds']))} (training seed; the evaluation "
            "prompts and seeds are the same for every row). The base model and reference rows do not depend on the "
            "training seed.")
    rows = [Row({"system": r["system"], "kind": r["kind"]}, {m: Stat(*v) for m, v in r["values"].items()}, r["kind"])
            for r in data["rows"]]
    return Table({"system": "System", "kind": None}, data["columns"], rows, title, note, cell_n=True)


# ------------------------------------------------------------------------------------------------------ sweeps
def find_runs(folder: Path) -> list[Path]:
    """Run folders below ``folder`` (any depth up to 4) that hold config.yaml and summary.json."""
    runs = sorted({p.parent for depth in range(0, 5) for p in folder.glob("/".join(["*"] * depth + ["summary.json"]))
                   if (p.parent / "config.yaml").is_file()})
    unfinished = sorted({p.parent for p in folder.rglob("config.yaml") if p.parent.name != ".hydra"} - set(runs))
    if unfinished:
        log.warning("%d run folder(s) without summary.json (unfinished) are left out, e.g. %s", len(unfinished),
                    unfinished[0])
    return runs


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def varied_keys(configs: list[dict]) -> list[str]:
    """Config keys whose value differs between runs (one key per group of keys that always vary together)."""
    keys = sorted({k for c in configs for k in c})
    varied = [k for k in keys if not k.startswith(IGNORED_PREFIXES) and len({json.dumps(c.get(k)) for c in configs}) > 1]
    kept, seen = [], {}
    for k in sorted(varied, key=lambda k: (k.count("."), len(k))):  # prefer top-level, short names (lambda, method.name)
        sig = tuple(json.dumps(c.get(k)) for c in configs)
        if sig not in seen and tuple(reversed(sig)) not in seen:
            seen[sig] = k
            kept.append(k)
    return kept


def run_numbers(run: Path) -> dict:
    """The numbers a run reports: summary.json's top-level numbers, and eval.json's metrics as ``eval.<name>`` (but
    those that copy a summary field, as train_time: summary.json has them)."""
    summary = json.loads((run / "summary.json").read_text())
    out = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if (run / "eval.json").is_file():
        for k, v in json.loads((run / "eval.json").read_text()).get("metrics", {}).items():
            if isinstance(v, (int, float)) and not getattr(resolve(k), "summary_key", None):
                out[f"eval.{k}"] = float(v)
    return out


def sweep(folder: Path, runs: list[Path]) -> dict:
    """{folder, varied, replicates, metrics, rows: [{setting, runs, n, seeds, <metric>, <metric>_std}]}: one row per
    setting of the varied keys, mean and std over its replicates. Columns: the probe's numbers, then the runs'
    evaluations (``eval.<name>``), then the summary's (training time)."""
    if not runs:
        raise UserError(f"no finished runs (config.yaml + summary.json) below '{folder}': pass the folder of a "
                        "multirun (outputs/multirun/<date>/<time>)")
    configs = [flatten(OmegaConf.to_container(OmegaConf.load(r / "config.yaml"), resolve=False)) for r in runs]
    keys = varied_keys(configs)
    settings = [k for k in keys if k not in REPLICATE_KEYS]
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(tuple(c.get(k) for k in settings), []).append(i)
    numbers = [run_numbers(r) for r in runs]
    metrics = sorted(shown_in("sweep", {k for n in numbers for k in n}),
                     key=lambda k: (resolve(k).summary_key is not None, k.startswith("eval.")))  # stable: registry order
    rows = []
    for values, idx in sorted(groups.items(), key=lambda kv: tuple(str(v) if not isinstance(v, (int, float)) else
                                                                      f"{v:020.6f}" for v in kv[0])):
        row = {"setting": dict(zip(settings, values)), "runs": [str(runs[i]) for i in idx], "n": len(idx),
               "seeds": sorted({configs[i].get("trainer.seed") for i in idx}, key=str)}
        for m in metrics:
            vals = [numbers[i][m] for i in idx if m in numbers[i]]
            if vals:
                row[m], row[f"{m}_std"] = mean_std(vals)
        rows.append(row)
    return {"folder": str(folder), "varied": settings, "replicates": [k for k in keys if k in REPLICATE_KEYS],
            "metrics": metrics, "rows": rows}


def sweep_table(data: dict) -> Table:
    rows = [Row({**r["setting"], "n": r["n"]}, {m: Stat(r[m], r[f"{m}_std"], r["n"]) for m in data["metrics"] if m in r})
            for r in data["rows"]]
    return Table({**{k: k for k in data["varied"]}, "n": "seeds"}, data["metrics"], rows)


# ---------------------------------------------------------------------------------------------------- frontier
def frontier(runs_by_seed: dict[int, Path], methods: list[str]) -> list[dict]:
    """Each method's erasure curve averaged over seeds: one row {method, step, n, <key>, <key>_std} per (method,
    iteration), from the ``probe.jsonl`` of ``<runs>/<method>`` (written with ``trainer.probe_points``). A closed-form
    method's points along its edit strength (``edit_strength`` in probe.jsonl) are rows of their own, with the key."""
    rows = []
    for m in methods:
        by_point: dict[tuple, list[dict]] = {}
        for root in runs_by_seed.values():
            f = root / m / "probe.jsonl"
            if f.is_file():
                for line in f.read_text().splitlines():
                    if line.strip():
                        p = json.loads(line)
                        by_point.setdefault((int(p["step"]), p.get("edit_strength")), []).append(p)
        for step, strength in sorted(by_point, key=lambda k: (k[0], k[1] or 0.0)):
            points = by_point[step, strength]
            row = dict(method=m, step=step, n=len(points), **({} if strength is None else {"edit_strength": strength}))
            for k in shown_in("frontier", {k for p in points for k in p}):
                row[k], row[f"{k}_std"] = mean_std([float(p[k]) for p in points if k in p])
            rows.append(row)
    return rows


def frontier_table(rows: list[dict]) -> Table:
    """Iteration 0 is the base model (an oracle row, not ranked)."""
    keys = shown_in("frontier", {k for r in rows for k in r})
    strength = any("edit_strength" in r for r in rows)  # a closed-form method's curve: a column for its points
    labels = {"method": "method", "step": "iteration", **({"edit_strength": "edit strength"} if strength else {}), "n": "seeds"}
    return Table(labels, keys,
                 [Row({"method": r["method"], "step": r["step"], **({"edit_strength": r.get("edit_strength")} if strength else {}),
                       "n": r["n"]},
                      {k: Stat(r[k], r[f"{k}_std"], r["n"]) for k in keys if k in r}, "base" if r["step"] == 0 else "run")
                  for r in rows])
