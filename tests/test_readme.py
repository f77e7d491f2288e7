"""The README's tables stay true to the code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch

from apt_hf.mtl import METHODS
from apt_hf.optim import APTMuon

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _table(header: str) -> list[list[str]]:
    lines = README[README.index(header) :].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_methods_table_matches_the_name_table():
    rows = _table("## MTL methods")
    table = {row[0].strip("`"): (row[1], row[3] or None) for row in rows}
    assert table == {name: (cls.kind, cls.extra) for name, cls in METHODS.items()}


def test_options_table_matches_optimizer_defaults():
    rows = _table("## Optimizer options")
    opt = APTMuon([torch.zeros(2, 2, requires_grad=True)])
    defaults = {**opt.defaults, "update_cos_every": opt.update_cos_every}
    signature = inspect.signature(APTMuon.__init__).parameters
    for name, default, _allowed, _meaning in rows:
        name = name.strip("`")
        assert name in defaults and name in signature, name
        if name == "beta_max":
            assert signature[name].default is None and default == "base momentum"
            continue
        value = defaults[name]
        shown = default.strip("`").strip('"')
        if isinstance(value, bool | str):
            assert shown == str(value), name
        else:
            assert float(shown) == float(value), name
    documented = {row[0].strip("`") for row in rows}
    apt_keys = {
        "apt",
        "beta_min",
        "beta_max",
        "beta_map",
        "granularity",
        "cos_eps",
        "direction_preservation",
        "dp_gamma",
    }
    assert apt_keys <= documented


def test_readme_setup_is_exactly_two_commands_matching_ci():
    block = re.search(r"## Set-up\n\n```bash\n(.*?)```", README, re.S).group(1).strip()
    commands = block.splitlines()
    assert len(commands) == 2
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    for command in commands:
        assert (
            command.replace("pip install", "python3 -m pip install -q").replace(
                "pytest", "python3 -m pytest"
            )
            in ci
        )


def test_aptconfig_options_table_is_generated_from_the_fields():
    from apt_hf.config import options_table

    assert options_table() in README
