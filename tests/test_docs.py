"""The commands in README.md and docs/ are real: every `lmforge` command line in a bash block parses
with lmforge's own argument parser, names a shipped recipe, and sets only keys that exist."""

import re
import shlex
from pathlib import Path

import pytest

from lmforge.cli import build_parser
from lmforge.config import apply_overrides, config_from_dict, resolve_recipe, read_yaml

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _commands(page: Path) -> list[str]:
    """`lmforge ...` command lines (continuations joined, comments cut) from a page's bash blocks."""
    found, block = [], False
    lines = page.read_text(encoding="utf-8").splitlines()
    joined: list[str] = []
    for line in lines:
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh")
            continue
        if not block:
            continue
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line.strip()
        else:
            joined.append(line.strip())
    for line in joined:
        for part in line.split("&&"):
            part = re.sub(r"\s+#\s.*$", "", part).strip()
            match = re.search(r"(?:^|\s|/)lmforge (.*)$", part)
            if match and "[" not in match.group(1).split("#")[0].replace("[MASK]", ""):
                found.append(match.group(1))
    return found


CASES = [(page.relative_to(REPO).as_posix(), command) for page in PAGES for command in _commands(page)]


def test_the_pages_hold_commands():
    assert len(CASES) > 20


@pytest.mark.parametrize("page,command", CASES)
def test_documented_commands_parse_and_name_real_recipes_and_keys(page, command):
    args = build_parser().parse_args(shlex.split(command))  # an unknown verb or flag exits here
    config_name = getattr(args, "config", None)
    if args.verb in ("pretrain", "prepare") and config_name and not config_name.endswith(".yaml"):
        data = read_yaml(resolve_recipe(config_name))  # a shipped recipe by name
        overrides = list(getattr(args, "overrides", []))
        apply_overrides(data, overrides)
        config_from_dict(data)  # every key exists and every value is valid
