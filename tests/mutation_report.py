"""``make mutation``'s report: the mutation score of each module mutmut mutated (``[tool.mutmut]`` in pyproject.toml),
and every surviving mutant with the line it changed.

mutmut keeps its verdicts in ``mutants/<module>.py.meta`` (exit code per mutant: 1 or 3 = a test failed, the mutant is
killed; 0 = every test passed, it survived; 36, 24 and the like = it ran past its time limit, which also counts as
killed). A survivor that only changes the text of an error or log message (a ``raise``, a ``log.*`` or
``warnings.warn`` call) is counted apart as a *message* mutant: the tests check the messages users meet in
``test_cli``/``test_config_validation``, not every wording, and no message changes a number of the comparison.

    python -m tests.mutation_report [--markdown]   # after `mutmut run`; reads ./mutants

mutmut's verdicts live in ``mutants/`` (not committed: it also holds a mutated copy of every source file). So that
a fresh clone continues where the last run stopped, ``--save`` copies the verdict files (``<module>.py.meta``) to
``tests/mutation_state/`` (committed) and ``--restore`` copies them back into ``mutants/`` where it has none; mutmut
keeps a verdict as long as its function's source is unchanged (it hashes each function) and checks again the
mutants of changed functions. ``make mutation`` restores before and saves after ``mutmut run``.
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


def _equivalent_kind(stack: list[ast.AST], a, b) -> str | None:
    """The class of an equivalent change at one difference, or None. ``stack``: the original's nodes above it.

    - ``device``: a ``device=`` argument or a ``.to(...)`` argument changed or dropped. The tests run on the CPU, where
      ``device=None`` and ``.to(None)`` leave the tensor where the original puts it.
    - ``randint``: ``randint(0, n, ...)`` became ``randint(n, ...)``: torch's low defaults to 0, the same draw.
    """
    def mentions_device(node) -> bool:
        return any(isinstance(n, ast.Attribute) and n.attr == "device" or isinstance(n, ast.Name) and n.id == "device"
                   for n in ast.walk(node))

    parent = stack[-1] if stack else None
    if isinstance(parent, ast.Call) and isinstance(a, list) and isinstance(b, list) and len(b) == len(a) - 1:
        dumps = [ast.dump(x) for x in b]
        dropped = [x for x in a if ast.dump(x) not in dumps]
        if len(dropped) == 1 and isinstance(dropped[0], ast.keyword) and dropped[0].arg == "device":
            return "device"  # device=... dropped
        if (len(dropped) == 1 and isinstance(parent.func, ast.Attribute) and parent.func.attr == "to"
                and mentions_device(dropped[0])):
            return "device"  # .to(x.device, ...) lost its device
    elif isinstance(a, ast.AST) and mentions_device(a) or a is None and isinstance(b, ast.AST):
        for node in reversed(stack):  # inside a device= argument or the device argument of .to(...)
            if isinstance(node, ast.keyword):
                if node.arg == "device":
                    return "device"
                break
            if isinstance(node, ast.Call):
                if isinstance(node.func, ast.Attribute) and node.func.attr == "to" and isinstance(a, ast.AST):
                    return "device"
                break
    if isinstance(parent, ast.Call) and isinstance(a, list) and isinstance(b, list):
        func = parent.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (name == "randint" and len(a) == len(b) + 1 and isinstance(a[0], ast.Constant) and a[0].value == 0
                and all(ast.dump(x) == ast.dump(y) for x, y in zip(a[1:], b))):
            return "randint"
    return None


def changed(orig: ast.AST, mutant: ast.AST) -> tuple[int, int, bool, str | None]:
    """(line of the first difference in the original, the same in the mutant, whether every difference lies inside a
    message statement, the equivalence class every difference belongs to or None: :func:`_equivalent_kind`)."""
    first: list[int] = []
    message = True
    kinds: set[str | None] = set()

    def differ(a, b, in_message, lines, stack):
        nonlocal message
        if not first:
            first.extend(lines)
        message = message and in_message
        kinds.add(_equivalent_kind(stack, a, b))

    def walk(a, b, in_message, lines, stack):
        if type(a) is not type(b):
            return differ(a, b, in_message, lines, stack)
        if isinstance(a, ast.AST):
            in_message = in_message or _is_message(a)
            lines = (getattr(a, "lineno", lines[0]), getattr(b, "lineno", lines[1]))
            for field in a._fields:
                walk(getattr(a, field, None), getattr(b, field, None), in_message, lines, [*stack, a])
        elif isinstance(a, list):
            if len(a) != len(b):
                return differ(a, b, in_message, lines, stack)
            for x, y in zip(a, b):
                walk(x, y, in_message, lines, stack)
        elif a != b:
            differ(a, b, in_message, lines, stack)

    walk(orig.body, mutant.body, False, (orig.lineno, mutant.lineno), [])
    kind = kinds.pop() if len(kinds) == 1 else None
    return (*(first or (0, 0)), message, kind)


def collect(root: Path = ROOT) -> dict[str, dict]:
    out = {}
    for rel in modules(root):
        meta_path = root / "mutants" / f"{rel}.meta"
        mutated = root / "mutants" / rel
        if not meta_path.is_file() or not mutated.is_file():
            out[rel] = dict(total=0, checked=0, killed=0, survived=[], message=[], equivalent=[], other=0, untested=0)
            continue
        meta = json.loads(meta_path.read_text())
        codes = meta.get("exit_code_by_key", {})
        source = mutated.read_text()
        functions = _functions(ast.parse(source))
        lines = source.splitlines()
        total = sum(1 for name in functions if "__mutmut_" in name and not name.endswith("__mutmut_orig"))
        row = dict(total=total, checked=0, killed=0, survived=[], message=[], equivalent=[], other=0, untested=0)
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
            before, after, message, kind = changed(orig, mut) if orig is not None and mut is not None else \
                (0, 0, False, None)
            text = f"{lines[before - 1].strip()}  ->  {lines[after - 1].strip()}" if before else "?"
            if code == 0 and message:
                row["message"].append((key, code, text))
            elif code == 0 and kind:
                row["equivalent"].append((key, kind, text))
            else:
                row["survived"].append((key, code, text))
        out[rel] = row
    return out


STATE = ROOT / "tests" / "mutation_state"


def _copy_meta(src: Path, dst: Path, keep_existing: bool) -> list[str]:
    """Copy each listed module's ``<module>.py.meta`` from ``src`` to ``dst`` (atomically; where ``dst`` already has
    one, only unless ``keep_existing``). Returns the modules copied."""
    from erasure.io import write_text_atomic

    todo = {rel: (src / f"{rel}.meta").read_text() for rel in modules() if (src / f"{rel}.meta").is_file()
            and not (keep_existing and (dst / f"{rel}.meta").is_file())}
    for text in todo.values():
        json.loads(text)  # one torn verdict file and nothing is copied
    for rel, text in todo.items():
        write_text_atomic(dst / f"{rel}.meta", text)
    return list(todo)


def save(state: Path = STATE) -> list[str]:
    """mutants/ -> tests/mutation_state/ (the verdicts so far, to commit)."""
    return _copy_meta(ROOT / "mutants", state, keep_existing=False)


def restore(state: Path = STATE) -> list[str]:
    """tests/mutation_state/ -> mutants/, for the modules mutants/ has no verdicts of yet (a fresh clone)."""
    return _copy_meta(state, ROOT / "mutants", keep_existing=True)


def score(row: dict) -> float | None:
    """Killed over checked, message and equivalent mutants aside (they are listed, not scored)."""
    scored = row["checked"] - len(row["message"]) - len(row["equivalent"])
    return row["killed"] / scored if scored else None


def report(data: dict[str, dict], markdown: bool) -> str:
    head = ("| module | mutants | checked | killed | survived | of them untested | message-only | equivalent | score |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for rel, row in data.items():
        s = score(row)
        rows.append(f"| `{rel}` | {row['total']} | {row['checked']} | {row['killed']} | {len(row['survived'])} | {row['untested']} | "
                    f"{len(row['message'])} | {len(row['equivalent'])} | {'—' if s is None else f'{100 * s:.1f}%'} |")
    text = "\n".join([head, *rows])
    survivors = [(rel, key, code, line) for rel, row in data.items() for key, code, line in row["survived"]]
    if survivors:
        text += "\n\nSurviving mutants (module, mutant, exit code, the line it changed):\n"
        text += "\n".join(f"- `{key}` ({'survived' if code == 0 else 'no test reaches it' if code in (5, 33) else f'exit {code}'}): `{line}`"
                          for rel, key, code, line in survivors)
    equivalent = [(key, kind, line) for row in data.values() for key, kind, line in row["equivalent"]]
    if equivalent:
        text += "\n\nEquivalent mutants, by class (tests/mutation_report.py _equivalent_kind says why each is one):\n"
        text += "\n".join(f"- `{key}` ({kind}): `{line}`" for key, kind, line in equivalent)
    return text if markdown else text.replace("`", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the table and survivors as markdown")
    parser.add_argument("--save", action="store_true", help="copy mutmut's verdicts to tests/mutation_state/ (commit them)")
    parser.add_argument("--restore", action="store_true", help="copy the committed verdicts into mutants/ where it has none")
    args = parser.parse_args()
    if args.restore or args.save:
        done = restore() if args.restore else save()
        where = "tests/mutation_state -> mutants" if args.restore else "mutants -> tests/mutation_state"
        print(f"{where}: {len(done)} module(s){': ' + ', '.join(done) if done else ''}")
        return
    if not (ROOT / "mutants").is_dir():
        print("no mutants/ folder: run `make mutation` (mutmut run) first", file=sys.stderr)
        raise SystemExit(2)
    print(report(collect(), args.markdown))


if __name__ == "__main__":
    main()
