"""The `apt-hf` command and the offline MultiDigits recipe, end to end on tiny settings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from apt_hf import METHODS, cli
from apt_hf.recipes import parse_recipe_args

TINY = [
    "--num_train_epochs",
    "1",
    "--n_train_pairs",
    "96",
    "--n_eval_pairs",
    "64",
    "--per_device_train_batch_size",
    "32",
    "--warmup_steps",
    "0",
    "--logging_steps",
    "1",
    "--use_cpu",
    "true",
]


def test_methods_lists_the_name_table(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in METHODS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert cls.kind in line and (cls.extra or "-") in line


def test_train_multidigits_reports_tasks_and_delta_m(tmp_path, capsys):
    cli.run(["train", "multidigits", *TINY, "--output_dir", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    metrics = results["metrics"]
    for key in ("eval_left/accuracy", "eval_right/accuracy", "eval_delta_m"):
        assert key in metrics
    assert results["config"]["mtl_method"] == "pcgrad"  # from recipes/configs/multidigits.yaml
    out = capsys.readouterr().out
    assert "left/accuracy" in out and "Delta_m%" in out
    assert (tmp_path / "config.json").is_file()  # the trained model was saved


def test_single_task_baseline_run(tmp_path):
    cli.run(
        [
            "train",
            "multidigits",
            *TINY,
            "--tasks",
            "left",
            "--mtl_method",
            "ew",
            "--output_dir",
            str(tmp_path),
        ]
    )
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert "eval_left/accuracy" in metrics and "eval_right/accuracy" not in metrics


def test_compare_writes_table_json_and_plots(tmp_path, capsys):
    summary = cli.run(
        [
            "compare",
            "multidigits",
            "--methods",
            "ew,pcgrad",
            "--optimizers",
            "adamw",
            "--apt",
            "off,on",
            "--seeds",
            "1",
            "--output-dir",
            str(tmp_path),
            *TINY,
        ]
    ) or json.loads((tmp_path / "comparison.json").read_text())
    assert set(summary) == {
        "ew/adamw/apt-off",
        "ew/adamw/apt-on",
        "pcgrad/adamw/apt-off",
        "pcgrad/adamw/apt-on",
    }
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("\n| ") == 5  # header + 4 combinations
    for png in ("metrics.png", "curves.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "[4/4]" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train", "nosuchrecipe"], "unknown recipe 'nosuchrecipe'.*multidigits"),
        (["compare", "multidigits", "--methods", "ew,sgd"], r"--methods 'ew,sgd': \['sgd'\]"),
        (["compare", "multidigits", "--apt", "maybe"], "--apt 'maybe'"),
        (["train", "multidigits", "--tasks", "middle"], "tasks='middle'"),
    ],
)
def test_bad_cli_input(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        cli.run([*argv, "--output_dir", str(tmp_path)] if argv[0] == "train" else argv)


@dataclass
class _Extra:
    size: int = field(default=3, metadata={"help": "a size"})


def test_recipe_args_yaml_defaults_and_cli_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "output_dir: out\nmtl_method: mgda\nsize: 7\nmuon_lr: 0.05\n"
        "mtl_method_kwargs:\n  normalization: l2\n"
    )
    args, extra = parse_recipe_args((_Extra,), ["--config", str(config), "--muon_lr", "0.01"])
    assert (args.mtl_method, args.muon_lr, extra.size) == ("mgda", 0.01, 7)
    assert args.mtl_method_kwargs == {"normalization": "l2"}
    config.write_text("output_dir: out\nmtl_methd: mgda\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['mtl_methd'\]"):
        parse_recipe_args((_Extra,), ["--config", str(config)])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_recipe_args((_Extra,), ["--config", str(tmp_path / "nope.yaml")])


def test_recipe_help_prints(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.run(["train", "multidigits", "--help"])
    assert exc.value.code == 0
    assert "--mtl_method" in capsys.readouterr().out


def test_last_evals_mean_follows_the_protocol():
    from apt_hf.recipes import last_evals_mean

    history = [{"loss": 1.0, "step": 1}] + [{"eval_a/x": float(i), "step": i} for i in range(12)]
    assert last_evals_mean(history) == {"eval_a/x": sum(range(2, 12)) / 10}
    assert last_evals_mean(history, k=1) == {"eval_a/x": 11.0}
    assert last_evals_mean([{"loss": 1.0}]) == {}


def test_console_script_exits_zero():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "apt_hf.cli", "methods"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" or "Warning" in proc.stderr
    assert "pcgrad" in proc.stdout
