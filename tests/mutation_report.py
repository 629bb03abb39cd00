"""``make mutation``'s report: the mutation score of each module mutmut mutated (``[tool.mutmut]`` in pyproject.toml),
and every surviving mutant with the line it changed.

mutmut keeps its verdicts in ``mutants/<module>.py.meta`` (exit code per mutant: 1 or 3 = a test failed, the mutant is
killed; 0 = every test passed, it survived; 36, 24 and the like = it ran past its time limit, which also counts as
killed). A survivor that only changes the text of an error or log message (a ``raise``, a ``log.*`` or
``warnings.warn`` call) is counted apart as a *message* mutant: the tests check the messages users meet in
``test_cli``/``test_config_validation``, not every wording, and no message changes a number of the comparison.

    python -m tests.mutation_report [--markdown]   # after `mutmut run`; reads ./mutants
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILLED = {1, 3, 24, -24, 36, 152, 255}
MESSAGE_CALLS = {"log", "logger", "logging", "warnings"}


def modules(root: Path = ROOT) -> list[str]:
    """The files ``[tool.mutmut] only_mutate`` selects, minus ``do_not_mutate``, as paths relative to ``root``."""
    conf = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mutmut"]
    found = []
    for src in conf["source_paths"]:
        for path in sorted((root / src).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if any(fnmatch(rel, p) for p in conf["only_mutate"]) and not any(fnmatch(rel, p) for p in
                                                                              conf.get("do_not_mutate", [])):
                found.append(rel)
    return found


def _functions(tree: ast.AST) -> dict[str, ast.AST]:
    """Every function definition of the mutated file by name (mutants are ``x_<name>__mutmut_<n>`` functions, methods
    ``xǁ<Class>ǁ<name>__mutmut_<n>`` inside their class)."""
    return {node.name: node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _is_message(stmt: ast.AST) -> bool:
    if isinstance(stmt, ast.Raise):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        func = stmt.value.func
        while isinstance(func, ast.Attribute):
            func = func.value
        return isinstance(func, ast.Name) and func.id in MESSAGE_CALLS
    return False


def changed(orig: ast.AST, mutant: ast.AST) -> tuple[int, int, bool]:
    """(line of the first difference in the original, the same in the mutant, whether every difference lies inside a
    message statement)."""
    first: list[int] = []
    message = True

    def differ(a, b, in_message, lines):
        nonlocal message
        if not first:
            first.extend(lines)
        message = message and in_message

    def walk(a, b, in_message, lines):
        if type(a) is not type(b):
            return differ(a, b, in_message, lines)
        if isinstance(a, ast.AST):
            in_message = in_message or _is_message(a)
            lines = (getattr(a, "lineno", lines[0]), getattr(b, "lineno", lines[1]))
            for field in a._fields:
                walk(getattr(a, field, None), getattr(b, field, None), in_message, lines)
        elif isinstance(a, list):
            if len(a) != len(b):
                return differ(a, b, in_message, lines)
            for x, y in zip(a, b):
                walk(x, y, in_message, lines)
        elif a != b:
            differ(a, b, in_message, lines)

    walk(orig.body, mutant.body, False, (orig.lineno, mutant.lineno))
    return (*(first or (0, 0)), message)


def collect(root: Path = ROOT) -> dict[str, dict]:
    out = {}
    for rel in modules(root):
        meta_path = root / "mutants" / f"{rel}.meta"
        mutated = root / "mutants" / rel
        if not meta_path.is_file() or not mutated.is_file():
            out[rel] = dict(total=0, checked=0, killed=0, survived=[], message=[], other=0, untested=0)
            continue
        meta = json.loads(meta_path.read_text())
        codes = meta.get("exit_code_by_key", {})
        source = mutated.read_text()
        functions = _functions(ast.parse(source))
        lines = source.splitlines()
        total = sum(1 for name in functions if "__mutmut_" in name and not name.endswith("__mutmut_orig"))
        row = dict(total=total, checked=0, killed=0, survived=[], message=[], other=0, untested=0)
        for key, code in sorted(codes.items()):
            if code is None:
                continue
            row["checked"] += 1
            if code in KILLED:
                row["killed"] += 1
                continue
            if code in (5, 33):  # no selected test reaches the function (e.g. only a subprocess calls it)
                row["untested"] += 1
            elif code != 0:  # segfault, suspicious: a survivor of its own kind
                row["other"] += 1
            name = key.rsplit(".", 1)[-1]
            orig = functions.get(name.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
            mut = functions.get(name)
            before, after, message = changed(orig, mut) if orig is not None and mut is not None else (0, 0, False)
            text = f"{lines[before - 1].strip()}  ->  {lines[after - 1].strip()}" if before else "?"
            (row["message"] if message and code == 0 else row["survived"]).append((key, code, text))
        out[rel] = row
    return out


def score(row: dict) -> float | None:
    """Killed over checked, message mutants aside (they are listed, not scored)."""
    scored = row["checked"] - len(row["message"])
    return row["killed"] / scored if scored else None


def report(data: dict[str, dict], markdown: bool) -> str:
    head = ("| module | mutants | checked | killed | survived | of them untested | message-only | score |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for rel, row in data.items():
        s = score(row)
        rows.append(f"| `{rel}` | {row['total']} | {row['checked']} | {row['killed']} | {len(row['survived'])} | {row['untested']} | "
                    f"{len(row['message'])} | {'—' if s is None else f'{100 * s:.1f}%'} |")
    text = "\n".join([head, *rows])
    survivors = [(rel, key, code, line) for rel, row in data.items() for key, code, line in row["survived"]]
    if survivors:
        text += "\n\nSurviving mutants (module, mutant, exit code, the line it changed):\n"
        text += "\n".join(f"- `{key}` ({'survived' if code == 0 else 'no test reaches it' if code in (5, 33) else f'exit {code}'}): `{line}`"
                          for rel, key, code, line in survivors)
    return text if markdown else text.replace("`", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the table and survivors as markdown")
    args = parser.parse_args()
    if not (ROOT / "mutants").is_dir():
        print("no mutants/ folder: run `make mutation` (mutmut run) first", file=sys.stderr)
        raise SystemExit(2)
    print(report(collect(), args.markdown))


if __name__ == "__main__":
    main()
