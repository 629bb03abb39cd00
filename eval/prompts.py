"""Prompt sets: rows of (case number, prompt, seed[, guidance]) from ESD-style CSVs, COCO caption
annotations (pycocotools) or a list in the config; each cut to its first ``n`` rows.

A prompt-set node (``conf/eval/suite/*.yaml``, ``prompt_sets.<name>``) names its ``kind``:

- ``csv``: ``path``, ``prompt_col`` (prompt), ``seed_col`` (evaluation_seed), ``case_col`` (case_number;
  the row index when the file has no such column), ``guidance_col`` (optional, per-row guidance, as I2P's
  evaluation_guidance), ``category`` with ``category_col`` (categories; I2P's comma-separated list).
- ``coco_json``: ``path`` to a COCO caption annotation file (captions_val2014.json); the first caption
  of each image, images in id order; seeds ``seed + i``; the case number is the image id.
- ``list``: ``prompts`` (strings) × ``seeds`` (ints); case numbers count the prompts.

Relative paths are resolved against the repository root; the prompt sets are vendored in ``data/prompts``
(the eval configs' default ``data_dir``; provenance and sha256 in its README.md).
"""
from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

from erasure.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class PromptRow:
    case: int  # case number (the CSV's case_number, a COCO image id, or the row index)
    prompt: str
    seed: int
    guidance: float | None = None  # per-row guidance; None: the sampler's default


def resolve_path(path: str | Path) -> Path:
    path = Path(str(path)).expanduser()
    return path if path.is_absolute() else ROOT / path


def load_prompt_set(spec, name: str = "prompts") -> list[PromptRow]:
    """The rows of one prompt-set config node, cut to ``spec.n`` (null: all)."""
    kind = str(spec.get("kind", "csv"))
    loaders = {"csv": _from_csv, "coco_json": _from_coco_json, "list": _from_list}
    if kind not in loaders:
        raise UserError(f"prompt set '{name}' has unknown kind '{kind}': choose one of {', '.join(loaders)}")
    n = spec.get("n")
    if n is not None and int(n) < 1:
        raise UserError(f"prompt set '{name}': n must be at least 1 (or null for all rows), got {n}")
    rows = loaders[kind](spec, name, None if n is None else int(n))
    if not rows:
        raise UserError(f"prompt set '{name}' is empty after filtering: check its path, category and n")
    return rows


def _from_csv(spec, name: str, n: int | None) -> list[PromptRow]:
    path = resolve_path(spec.path)
    if not path.is_file():
        raise UserError(f"prompt set '{name}': no CSV at '{path}' (set eval data_dir or prompt_sets.{name}.path)")
    prompt_col = str(spec.get("prompt_col", "prompt"))
    seed_col = str(spec.get("seed_col", "evaluation_seed"))
    case_col = str(spec.get("case_col", "case_number"))
    guidance_col = spec.get("guidance_col")
    category = spec.get("category")
    category_col = str(spec.get("category_col", "categories"))
    try:
        return _read_csv(path, name, n, prompt_col, seed_col, case_col, guidance_col, category, category_col)
    except UnicodeDecodeError as exc:
        raise UserError(f"prompt set '{name}': {path} is not UTF-8 text (byte {exc.start}: {exc.reason}): save it as "
                        "UTF-8") from None
    except csv.Error as exc:
        raise UserError(f"prompt set '{name}': {path} is not a readable CSV ({exc}): check its quoting and field "
                        "lengths") from None


def _read_csv(path, name, n, prompt_col, seed_col, case_col, guidance_col, category, category_col) -> list[PromptRow]:
    rows: list[PromptRow] = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first column
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        needed = [prompt_col, seed_col] + ([str(guidance_col)] if guidance_col else []) + ([category_col] if category else [])
        missing = [c for c in needed if c not in header]
        if missing:
            raise UserError(f"prompt set '{name}': {path} has no column(s) {', '.join(missing)} (columns: {', '.join(header)})")
        for index, rec in enumerate(reader):
            line = reader.line_num
            if None in rec or any(rec.get(c) is None for c in header):
                fields = len(header) - sum(rec.get(c) is None for c in header) + len(rec.get(None) or [])
                raise UserError(f"prompt set '{name}': {path} line {line} has {fields} fields, the header has {len(header)}")
            if category and str(category) not in [c.strip() for c in rec[category_col].split(",")]:
                continue
            try:
                seed = int(float(rec[seed_col]))
                case = int(float(rec[case_col])) if case_col in rec and rec[case_col] != "" else index
                guidance = float(rec[str(guidance_col)]) if guidance_col else None
                if not 0 <= seed < 2 ** 63 or (guidance is not None and not math.isfinite(guidance)):
                    raise OverflowError(seed)
            except (ValueError, OverflowError):  # not a number, NaN, infinite, or beyond a 64-bit generator seed
                raise UserError(f"prompt set '{name}': {path} line {line}: {seed_col}/{case_col}"
                                f"{'/' + str(guidance_col) if guidance_col else ''} must be numbers (a seed in [0, 2^63), a finite "
                                f"guidance), got {rec.get(seed_col)!r}/{rec.get(case_col)!r}"
                                f"{'/' + repr(rec.get(str(guidance_col))) if guidance_col else ''}") from None
            prompt = rec[prompt_col].strip()
            if not prompt:
                raise UserError(f"prompt set '{name}': {path} line {line} has an empty {prompt_col}")
            rows.append(PromptRow(case=case, prompt=prompt, seed=seed, guidance=guidance))
            if n is not None and len(rows) >= n:
                break
    return rows


def _from_coco_json(spec, name: str, n: int | None) -> list[PromptRow]:
    path = resolve_path(spec.path)
    if not path.is_file():
        raise UserError(f"prompt set '{name}': no COCO caption annotation file at '{path}' (e.g. captions_val2014.json)")
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(str(path))
    seed0 = int(spec.get("seed", 0))
    rows = []
    for i, image_id in enumerate(sorted(coco.getImgIds())):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        if not anns:
            continue
        rows.append(PromptRow(case=int(image_id), prompt=str(anns[0]["caption"]).strip(), seed=seed0 + len(rows)))
        if n is not None and len(rows) >= n:
            break
    return rows


def _from_list(spec, name: str, n: int | None) -> list[PromptRow]:
    prompts = [str(p) for p in (spec.get("prompts") or [])]
    seeds = [int(s) for s in (spec.get("seeds") or [0])]
    if not prompts:
        raise UserError(f"prompt set '{name}' (kind list) has no prompts")
    rows = [PromptRow(case=i, prompt=p, seed=s) for i, p in enumerate(prompts) for s in seeds]
    return rows[:n] if n is not None else rows
