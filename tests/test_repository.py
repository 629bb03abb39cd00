"""The repository stands alone: no tracked file names a folder beside the clone, and the vendored prompt
sets in data/prompts/ match the sha256 list in their README."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess

import pytest

from tests.conftest import PROMPT_DATA, ROOT

# built from pieces so that this file does not contain the text it looks for
SIBLING = "..".__add__("/shared")
SHA_LINE = re.compile(r"^([0-9a-f]{64})  (\S.*)$")


def test_no_tracked_file_names_the_sibling_folder():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (or git is not installed)")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    needle = SIBLING.encode()
    offending = []
    for name in filter(None, listed.decode("utf-8", "surrogateescape").split("\0")):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, or a submodule
            continue
        data = path.read_bytes()
        if needle not in data:
            continue
        for number, line in enumerate(data.splitlines(), start=1):
            if needle in line:
                offending.append(f"{name}:{number}: {line.decode('utf-8', 'replace').strip()[:200]}")
    assert not offending, f"tracked files name {SIBLING} (a clone has no such folder):\n" + "\n".join(offending)


def readme_sums() -> dict[str, str]:
    sums = {}
    for line in (PROMPT_DATA / "README.md").read_text(encoding="utf-8").splitlines():
        match = SHA_LINE.match(line)
        if match:
            sums[match.group(2)] = match.group(1)
    return sums


def test_prompt_sets_match_their_sha256_list():
    sums = readme_sums()
    assert sums, "data/prompts/README.md has no sha256 list (lines '<hex>  <relative path>')"
    problems = []
    for name, expected in sorted(sums.items()):
        path = PROMPT_DATA / name
        if not path.is_file():
            problems.append(f"{name}: listed but missing")
        elif (got := hashlib.sha256(path.read_bytes()).hexdigest()) != expected:
            problems.append(f"{name}: sha256 {got}, the README lists {expected}")
    for path in sorted(PROMPT_DATA.rglob("*.csv")):
        name = path.relative_to(PROMPT_DATA).as_posix()
        if name not in sums:
            problems.append(f"{name}: not in the README's sha256 list")
    assert not problems, "data/prompts/ and its README disagree:\n" + "\n".join(problems)


def test_every_module_imports():
    """Every module of the packages imports (entry points included): a moved name fails here, not in a user's run."""
    import importlib

    names = sorted({".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                    for pkg in ("erasure", "eval", "baselines", "hydra_plugins") for p in (ROOT / pkg).rglob("*.py")})
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 -- report every failure at once
            failed[name] = f"{type(exc).__name__}: {exc}"
    assert not failed, failed
