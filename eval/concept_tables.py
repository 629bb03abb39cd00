"""The reporting side of ``make concepts``: every method trained on every toy-world concept, one seed each, the
concepts as the replicates.

Input: ``<runs_root>/<concept>/<method>/`` with ``delta.safetensors``, ``summary.json`` and ``config.yaml`` (a run
is finished when all three exist), or else the run's record ``<records>/<concept>/<method>/`` (``summary.json``,
``config.yaml``, ``recorded.json``: :func:`eval.experiment.record_run`). :func:`collect` reads the numbers, :func:`summary_table` and
:func:`per_concept_tables` lay them out for :mod:`eval.render`, :func:`ranks` and :func:`order_holds` count which
method wins where, :func:`broken_prompts` lists the preserved prompts a run broke and what they became,
:func:`figure` draws concept rate against SSIM and :func:`report` writes it all.

``preserved_attr_accuracy`` is the preservation of the erased concept's own attribute on the other prompts: shape
accuracy for a shape concept, colour accuracy for a colour concept (erasing ``red`` should keep green green).
Ties are judged at the displayed precision (the metric's format), as :mod:`eval.render` does.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

from erasure.io import to_json, write_text_atomic

from . import render
from .metrics import heading, resolve
from .render import Row, Stat, Table
from .tables import mean_std

log = logging.getLogger(__name__)
# the columns of the summary and the per-concept tables (summary.json keys)
METRICS = ("concept_rate_after", "preserved_accuracy_after", "preserved_color_accuracy_after", "ssim_preserved")
RANKED = ("ssim_preserved", "preserved_attr_accuracy", "concept_rate_after")  # what ranks() counts
ATTR_KEY = {"shape": "preserved_accuracy", "color": "preserved_color_accuracy"}  # the concept's own attribute
RUN_FILES = ("delta.safetensors", "summary.json", "config.yaml")
# a record (eval.experiment.record_run): what a report needs of a finished run, small enough to commit
# (results/concepts); the weights stay in the run folder
RECORD_FILES = ("summary.json", "config.yaml", "recorded.json")


def _number(v) -> float | None:
    """A finite float, or None (missing, not a number, NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _before(key: str) -> str | None:
    """The base model's summary key of a column (``concept_rate_after`` -> ``concept_rate_before``); SSIM has none."""
    return key.removesuffix("_after") + "_before" if key.endswith("_after") else None


def _shown(key: str, value: float) -> float:
    """The value as the tables show it (ties at the displayed precision)."""
    return float(resolve(key).format(value))


# --------------------------------------------------------------------------------------------------- reading
def _has(folder: Path, names: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in names)


def _probe(config: Path) -> dict:
    """The concept's probe and instruction concepts from a run's composed config."""
    concept = OmegaConf.to_container(OmegaConf.load(config), resolve=False).get("concept") or {}
    probe = concept.get("probe") or {}
    return dict(attribute=probe.get("attribute"), label=probe.get("concept"),
                preserve=[dict(p) for p in probe.get("preserve_prompts") or []],
                instructions=[dict(text=i.get("text"), guidance=i.get("guidance"))
                              for i in concept.get("instructions") or []])


def _record(summary: dict, kind: str | None, when: str) -> dict:
    """The numbers of one run's summary ``when`` = "after" (the erased model) or "before" (the base model)."""
    keys = {k: k if when == "after" else _before(k) for k in METRICS}  # column -> summary key (SSIM: none before)
    out = {k: _number(summary.get(key)) for k, key in keys.items() if key}
    suffix = "_after" if when == "after" else "_before"
    attr = ATTR_KEY.get(kind or "")
    out["preserved_attr_accuracy"] = _number(summary.get(attr + suffix)) if attr else None
    out["preserved_per_prompt"] = summary.get("preserved_per_prompt" + suffix)
    out["preserved_predictions"] = summary.get("preserved_predictions" + suffix)
    return out


def collect(runs_root: str | Path, concepts: list[str], methods: list[str], records: str | Path | None = None) -> dict:
    """The numbers of every (concept, method) run below ``runs_root``, or, for a run whose folder is not finished
    there, of its record below ``records``.

    Returns {root, concepts, methods, kinds: {concept: "shape" | "color" | None}, probes: {concept: {attribute,
    label, preserve}}, base: {concept: record | None}, runs: {concept: {method: record | None}}, missing: [(concept,
    method)], from_records: ["concept/method" read from a record]}. A run's record holds the summary's after-values under their summary keys (``concept_rate_after``, ...,
    ``ssim_preserved``), ``preserved_attr_accuracy``, ``ssim_target``, ``train_time_s``, the per-prompt dicts
    (``preserved_per_prompt``, ``preserved_predictions``; None when absent), the same before-values (``before``) and
    its instruction concepts. The base record (the first finished run's before-values) uses the after-keys too.
    """
    root = Path(runs_root)
    data = dict(root=str(root), concepts=list(concepts), methods=list(methods), kinds={}, probes={}, base={},
                runs={}, missing=[], from_records=[], records=str(records) if records is not None else None)
    for c in concepts:
        folders = {m: root / c / m for m in methods}
        for m, f in folders.items():
            kept = Path(records) / c / m if records is not None else None
            if not _has(f, RUN_FILES) and kept is not None and _has(kept, RECORD_FILES):
                folders[m] = kept
                data["from_records"].append(f"{c}/{m}")
        finished = [m for m, f in folders.items() if _has(f, RUN_FILES) or f"{c}/{m}" in data["from_records"]]
        configs = [f for m in sorted(methods, key=lambda m: m not in finished)  # a finished run's first
                   if (f := folders[m] / "config.yaml").is_file()]
        probe = _probe(configs[0]) if configs else dict(attribute=None, label=None, preserve=[], instructions=[])
        kind = probe["attribute"] if probe["attribute"] in ATTR_KEY else None
        data["kinds"][c] = kind
        data["probes"][c] = {k: probe[k] for k in ("attribute", "label", "preserve")}
        data["runs"][c], data["base"][c] = {}, None
        for m in methods:
            if m not in finished:
                data["runs"][c][m] = None
                data["missing"].append((c, m))
                continue
            summary = json.loads((folders[m] / "summary.json").read_text())
            rec = _record(summary, kind, "after")
            rec.update(ssim_target=_number(summary.get("ssim_target")),
                       train_time_s=_number(summary.get("train_time_s")), before=_record(summary, kind, "before"),
                       instructions=_probe(folders[m] / "config.yaml")["instructions"])
            data["runs"][c][m] = rec
            if data["base"][c] is None:
                data["base"][c] = dict(rec["before"])
    if data["missing"]:
        log.warning("%d of %d runs are missing, e.g. %s/%s", len(data["missing"]), len(concepts) * len(methods),
                    *data["missing"][0])
    return data


def _values(data: dict, method: str, key: str) -> list[float]:
    """The method's finite values of ``key``, one per concept it finished."""
    runs = (data["runs"][c][method] for c in data["concepts"])
    return [r[key] for r in runs if r is not None and r.get(key) is not None]


# ---------------------------------------------------------------------------------------------------- tables
def summary_table(data: dict, title: str | None = None) -> Table:
    """One row per method (and the base model first): mean ± std over the concepts it finished (sample std, as
    :func:`eval.tables.mean_std`), and how many concepts that is. Ranked by the renderer's rule."""
    def stats(values: list[float]):
        return Stat(*mean_std(values), len(values)) if values else None

    base = [b for b in (data["base"][c] for c in data["concepts"]) if b is not None]
    rows = [Row({"method": "base", "n": len(base)}, {k: stats([b[k] for b in base if b.get(k) is not None])
                                                     for k in METRICS}, "base")]
    for m in data["methods"]:
        n = sum(data["runs"][c][m] is not None for c in data["concepts"])
        rows.append(Row({"method": m, "n": n}, {k: stats(_values(data, m, k)) for k in METRICS}))
    note = ("Mean ± standard deviation over the concepts each method finished (one training seed each; the concepts "
            "are the replicates). The base row is the base model on the same probes; its SSIM to itself is 1.")
    return Table({"method": "Method", "n": "concepts"}, list(METRICS), rows, title, note, cell_n=True)


def best_methods(data: dict, concept: str, key: str, places: int = 1) -> list[str]:
    """The methods whose run on ``concept`` holds one of the ``places`` best distinct values of ``key`` (as
    displayed; ties share a place, the next distinct value is the next place), in method order."""
    better = resolve(key).higher_is_better
    shown = {m: _shown(key, r[key]) for m, r in data["runs"][concept].items()
             if r is not None and r.get(key) is not None}
    top = sorted(set(shown.values()), reverse=better)[:places]
    return [m for m in data["methods"] if m in shown and shown[m] in top]


def per_concept_tables(data: dict) -> list[Table]:
    """For each of :data:`METRICS` (in that order) a table with one row per concept (and its kind) and one column per
    method (``<metric>@<method>``: that run's value), after the base model's value (``<metric>@base``; none for SSIM).

    The renderer ranks within a column, which here would compare concepts; so the rows are not ranked (kind
    ``concept``) and the label column ``best`` names the best method(s) on each concept instead."""
    tables = []
    for key in METRICS:
        base_col = [f"{key}@base"] if _before(key) else []
        columns = base_col + [f"{key}@{m}" for m in data["methods"]]
        rows = []
        for c in data["concepts"]:
            values = {f"{key}@{m}": (r or {}).get(key) for m, r in data["runs"][c].items()}
            if base_col:
                values[base_col[0]] = (data["base"][c] or {}).get(key)
            best = ", ".join(best_methods(data, c, key)) or None
            rows.append(Row({"concept": c, "kind": data["kinds"][c], "best": best}, values, "concept"))
        note = ("One run per cell. `best`: the method(s) with the best value on that concept (ties at the displayed "
                "precision share it); cells are not ranked.")
        tables.append(Table({"concept": "Concept", "kind": "kind", "best": "best"}, columns, rows,
                            f"{heading(key)} per concept", note))
    return tables


def _markdown(table: Table) -> str:
    """The table's markdown without the renderer's ranking legend when no row is ranked (the per-concept tables)."""
    md = render.to_markdown(table)
    if any(r.kind == "run" for r in table.rows):
        return md
    paragraphs = md.rstrip("\n").split("\n\n")
    return "\n\n".join(p for p in paragraphs if not p.startswith(render.LEGEND)) + "\n"


# ----------------------------------------------------------------------------------------------------- ranks
def ranks(data: dict, keys=RANKED) -> dict:
    """{method: {key: {best, top2, of}}}: on how many concepts the method is best (in the top two) by each key among
    the methods that finished the concept, out of the ``of`` concepts it finished with a value. Ties share the place
    and the next distinct value is second, as in the tables."""
    out = {m: {k: dict(best=0, top2=0, of=len(_values(data, m, k))) for k in keys} for m in data["methods"]}
    for c in data["concepts"]:
        for k in keys:
            for place, field in ((1, "best"), (2, "top2")):
                for m in best_methods(data, c, k, place):
                    out[m][k][field] += 1
    return out


def order_holds(data: dict, better: str, than: list[str], metric: str) -> tuple[int, int]:
    """(on how many concepts ``better`` is strictly better by ``metric`` than every method in ``than``, on how many
    concepts all of them have a value). Compared as displayed: a tie is not better."""
    higher = resolve(metric).higher_is_better
    if higher is None:
        raise ValueError(f"'{metric}' has no direction: it cannot order methods")
    held = n = 0
    for c in data["concepts"]:
        runs = data["runs"][c]
        vals = [(runs[m] or {}).get(metric) for m in [better, *than]]
        if any(v is None for v in vals):
            continue
        n += 1
        mine, *others = (_shown(metric, v) for v in vals)
        held += all(mine > o if higher else mine < o for o in others)
    return held, n


def ranks_table(data: dict, keys=RANKED) -> Table:
    """:func:`ranks` as a table of counts (label columns only: counts are not metrics)."""
    r = ranks(data, keys)
    labels = {"method": "Method"}
    for k in keys:
        labels[f"{k}_best"] = f"{resolve(k).label}: best"
        labels[f"{k}_top2"] = f"{resolve(k).label}: top 2"
    rows = [Row({"method": m, **{f"{k}_{f}": f"{r[m][k][f]}/{r[m][k]['of']}" for k in keys for f in ("best", "top2")}},
                {}) for m in data["methods"]]
    note = ("Concepts on which the method is best (in the top two) among the methods that finished that concept, of "
            "the concepts it finished; ties share the place. Same-attribute accuracy: shape accuracy on the other "
            "prompts for a shape concept, colour accuracy for a colour concept.")
    return Table(labels, [], rows, "Wins per concept", note)


# ------------------------------------------------------------------------------------------- broken prompts
def _accuracy(per_prompt, predictions, prompt: str, attribute: str, truth) -> float | None:
    """Share of a preserved prompt's images read with the right ``attribute``: the shape from the per-prompt
    accuracy, else (and the colour always) from the prediction counts; None when the summary has neither."""
    if attribute == "shape" and per_prompt and prompt in per_prompt:
        return _number(per_prompt[prompt])
    counts = ((predictions or {}).get(prompt) or {}).get(attribute)
    if not counts or truth is None:
        return None
    return counts.get(truth, 0) / sum(counts.values())


def _named(label: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(label)}\b", text or "") is not None


def broken_prompts(data: dict, method: str, threshold: float = 0.8) -> list[dict]:
    """Preserved prompts that the method's run broke: accuracy on the concept's attribute (shape for a shape concept,
    colour for a colour concept) below ``threshold`` after erasure and at or above it before (when the summary
    has the before-value). Each entry: {concept, kind, prompt, truth, before, after, became (the most common wrong
    label, None without prediction counts), share (of the prompt's images), cause, instruction}. ``cause`` is
    ``instruction`` (the label is named by an instruction concept with positive guidance: ``instruction`` gives
    its text), ``erased`` (the erased concept itself), ``other``, or ``unknown`` (no prediction counts)."""
    out = []
    for c in data["concepts"]:
        run, kind, probe = data["runs"][c].get(method), data["kinds"][c], data["probes"][c]
        if run is None or kind is None:
            continue
        before = run["before"]
        for p in probe["preserve"]:
            prompt, truth = p["prompt"], p.get(kind)
            after = _accuracy(run["preserved_per_prompt"], run["preserved_predictions"], prompt, kind, truth)
            was = _accuracy(before["preserved_per_prompt"], before["preserved_predictions"], prompt, kind, truth)
            if after is None or after >= threshold or (was is not None and was < threshold):
                continue
            counts = ((run["preserved_predictions"] or {}).get(prompt) or {}).get(kind) or {}
            wrong = Counter({k: v for k, v in counts.items() if k != truth})
            became, n = wrong.most_common(1)[0] if wrong else (None, 0)
            pulled = next((i["text"] for i in run["instructions"]
                           if became and (i.get("guidance") or 0) > 0 and _named(became, i["text"])), None)
            cause = ("unknown" if became is None else "instruction" if pulled else
                     "erased" if became == probe["label"] else "other")
            out.append(dict(concept=c, kind=kind, prompt=prompt, truth=truth, before=was, after=after, became=became,
                            share=n / sum(counts.values()) if counts else None, cause=cause, instruction=pulled))
    return out


def _why(b: dict) -> str:
    return {"instruction": f"pulled towards an instruction: '{b['instruction']}'",
            "erased": "the erased concept itself", "other": "something else",
            "unknown": "no prediction counts in summary.json"}[b["cause"]]


def broken_table(broken: list[dict], method: str, threshold: float) -> Table:
    rows = [Row({"concept": b["concept"], "prompt": b["prompt"],
                 "before": "–" if b["before"] is None else f"{b['before']:.2f}", "after": f"{b['after']:.2f}",
                 "became": "–" if b["became"] is None else f"{b['became']} ({b['share']:.0%})", "why": _why(b)}, {})
            for b in broken]
    note = (f"Accuracy on the erased concept's attribute (shape or colour) of each preserved prompt's images, base "
            f"model and {method}; listed when it fell below {threshold:g}. became: the most common wrong label.")
    return Table({k: k for k in ("concept", "prompt", "before", "after", "became", "why")}, [], rows,
                 f"Preserved prompts {method} broke", note)


# ---------------------------------------------------------------------------------------------------- figure
def figure(data: dict, path: str | Path, title: str) -> Path | None:
    """Concept rate (y) against SSIM to the base model on the preserved prompts (x): per method the mean over its
    concepts with the std over them as error bars in both directions, its concepts as faint dots of the same colour,
    its name beside the mean; the base model (SSIM 1) as a star."""
    x_key, y_key = "ssim_preserved", "concept_rate_after"
    points = {m: [(r[x_key], r[y_key]) for c in data["concepts"] if (r := data["runs"][c][m]) is not None
                  and r.get(x_key) is not None and r.get(y_key) is not None] for m in data["methods"]}
    points = {m: p for m, p in points.items() if p}
    if not points:
        log.info("concepts figure: no run has both SSIM and concept rate")
        return None
    try:
        from erasure.images import pyplot, save_figure

        plt = pyplot()
    except ImportError as exc:
        log.info("concepts figure: matplotlib is unavailable (%s)", exc)
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colours = plt.get_cmap("tab10")
    for i, (m, pts) in enumerate(points.items()):
        (mx, sx), (my, sy) = mean_std([p[0] for p in pts]), mean_std([p[1] for p in pts])
        colour = colours(i % 10)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="", marker=".", ms=5, alpha=0.4, color=colour)
        ax.errorbar([mx], [my], xerr=[sx], yerr=[sy], marker="os^Dv<>pPXh"[i % 11], capsize=3, ls="", color=colour,
                    label=f"{m} (n={len(pts)})")
        ax.annotate(m, (mx, my), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    base = [b[y_key] for b in data["base"].values() if b is not None and b.get(y_key) is not None]
    if base:
        ax.plot([1.0], [sum(base) / len(base)], marker="*", ms=12, color="k", ls="", label="base model")
    ax.set_xlabel(heading(x_key))
    ax.set_ylabel(heading(y_key))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- report
def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def report(data: dict, out_dir: str | Path, title: str, threshold: float = 0.8) -> str:
    """Writes concepts_summary.{md,csv,tex}, concepts_<metric>.{md,csv,tex} per metric, concepts.json (the data),
    concepts.png and concepts.md (all atomically); returns concepts.md's markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_table(data, "Mean over concepts")
    render.write(summary, out, "concepts_summary")
    per = per_concept_tables(data)
    for key, table in zip(METRICS, per):
        write_text_atomic(out / f"concepts_{key}.md", _markdown(table))
        render.write(table, out, f"concepts_{key}", ("csv", "tex"))
    write_text_atomic(out / "concepts.json", to_json(data, indent=2) + "\n")
    png = figure(data, out / "concepts.png", title)
    kinds = Counter(data["kinds"].values())
    counts = (f"{_count(len(data['methods']), 'method')} on {_count(len(data['concepts']), 'concept')} "
              f"({_count(kinds.get('shape', 0), 'shape')}, {_count(kinds.get('color', 0), 'colour')})")
    md = [f"# {title}", "", f"{counts}, one training seed each: the concepts are the replicates.", "",
          render.to_markdown(summary)]
    if png:
        md += [f"![{heading('concept_rate_after')} against {heading('ssim_preserved')}]({png.name})", ""]
    md += ["## Per concept", ""]
    for table in per:
        md += [_markdown(table)]
    md += ["## Wins", "", render.to_markdown(ranks_table(data))]
    if "ours" in data["methods"]:
        broken = broken_prompts(data, "ours", threshold)
        md += ["## Broken prompts", ""]
        md += [render.to_markdown(broken_table(broken, "ours", threshold))] if broken else \
              [f"None: every preserved prompt the base model got right stayed at or above {threshold:g}.", ""]
    md += ["## Missing runs", ""]
    md += [f"- {c}/{m}" for c, m in data["missing"]] or ["None."]
    if data.get("from_records"):
        md += ["", "## Runs read from their records", "",
               f"{_count(len(data['from_records']), 'run')} had no finished run folder here and came from "
               f"{data.get('records') or 'the records'} (summary, config and where and when each was trained, "
               f"recorded.json): {', '.join(data['from_records'])}."]
    text = "\n".join(md).rstrip("\n") + "\n"
    write_text_atomic(out / "concepts.md", text)
    log.info("concepts report -> %s", out / "concepts.md")
    return text
