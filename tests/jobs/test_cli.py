"""The ``tal`` command line as a whole: every subcommand is there and explains itself, and asking for help stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jobs.cli import build_parser, main

COMMANDS = {"demo", "synth", "extract", "import-features", "export-features", "train", "evaluate", "serve", "detect", "export", "report"}


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_subcommand_exists_with_a_description_and_help_for_each_argument():
    subparsers = _subparsers()
    assert set(subparsers) == COMMANDS
    for name, parser in subparsers.items():
        assert parser.description, f"tal {name} has no description"
        undocumented = [a.option_strings or [a.dest] for a in parser._actions if a.help is None and a.dest != "help"]
        assert not undocumented, f"tal {name}: arguments without help {undocumented}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and f"tal {command}" in capsys.readouterr().out


# In a fresh interpreter: every --help, then which heavy modules got imported.
_HELP_EVERYWHERE = """
import contextlib, io, json, sys
from jobs.cli import main
codes = []
for argv in [["--help"]] + [[command, "--help"] for command in sys.argv[1:]]:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            codes.append(e.code)
heavy = ("torch", "ray", "mlflow", "torchvision", "matplotlib", "pyarrow", "cv2")
print(json.dumps({"codes": codes, "loaded": sorted(m for m in heavy if m in sys.modules)}))
"""


def test_help_imports_neither_torch_nor_ray():
    """``tal --help`` and ``tal COMMAND --help`` load no job module: each handler imports its own (jobs/cli/__init__.py)."""
    commands = sorted(COMMANDS)
    out = subprocess.run([sys.executable, "-c", _HELP_EVERYWHERE, *commands], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0] * (1 + len(commands))
    assert result["loaded"] == [], f"tal --help imported {result['loaded']}: import them inside the handler, not at the top of jobs/cli/"


def test_defaults_written_into_the_help_are_the_jobs():
    """The parsers repeat a few job constants (importing the job modules would load torch); they must agree."""
    from jobs import batch_detect, detect, evaluate, export
    from jobs.cli import detect as detect_cli
    from jobs.cli import evaluate as evaluate_cli
    from jobs.cli import export as export_cli
    from jobs.cli import extract as extract_cli
    from jobs.cli import synth as synth_cli
    from pipelines import synth
    from pipelines.decoders import DECODERS
    from pipelines.extract import SamplingConfig

    assert (detect_cli.DEFAULT_SCORE_THRESHOLD, detect_cli.DEFAULT_TIMELINE_VIDEOS) == (
        detect.DEFAULT_SCORE_THRESHOLD,
        detect.DEFAULT_TIMELINE_VIDEOS,
    )
    assert (detect_cli.DEFAULT_SHARD_VIDEOS, detect_cli.DEFAULT_SHARD_SECONDS) == (
        batch_detect.DEFAULT_SHARD_VIDEOS,
        batch_detect.DEFAULT_SHARD_SECONDS,
    )
    assert evaluate_cli.AUTO_RAY_VIDEOS == evaluate.AUTO_RAY_VIDEOS
    assert (export_cli.EXPORT_FORMATS, export_cli.DEFAULT_OPSET) == (export.EXPORT_FORMATS, export.DEFAULT_OPSET)
    assert SamplingConfig(**extract_cli.DEFAULT_SAMPLING) == SamplingConfig()
    assert extract_cli.DECODERS == DECODERS
    assert (synth_cli.ACTIVITYNET_JSON, synth_cli.THUMOS14_JSON, synth_cli.SUBSETS, synth_cli.MAX_CLASSES) == (
        synth.ACTIVITYNET_JSON,
        synth.THUMOS14_JSON,
        synth.SUBSETS,
        synth.MAX_CLASSES,
    )


def test_train_print_config_writes_the_full_effective_preset_that_loads_back(tmp_path, capsys):
    from tal_models.presets import load_preset

    assert (
        main(["train", "--config", "demo-tridet", "--set", "optim.lr=0.002", "--epochs", "5", "--batch-size", "3", "--print-config"]) == 0
    )
    path = tmp_path / "effective.yaml"
    path.write_text(capsys.readouterr().out)
    printed = load_preset(path)
    shipped = load_preset("demo-tridet")
    assert printed.detector == shipped.detector
    assert (printed.optim.lr, printed.optim.epochs, printed.optim.warmup_epochs, printed.batch_size) == (0.002, 5, 2, 3)
    assert printed.optim.weight_decay == shipped.optim.weight_decay  # everything else as shipped
    assert "base" not in path.read_text() and "regression_ranges" in path.read_text()  # full, not sparse


def test_train_needs_a_store_and_annotations_unless_printing(capsys):
    assert main(["train", "--config", "demo-tridet"]) == 2
    assert "--features, --annotations (or --print-config)" in capsys.readouterr().err


def test_train_set_takes_exponent_notation_as_a_number(tmp_path, capsys):
    """YAML 1.1 reads ``3e-4`` as a string; ``--set optim.lr=3e-4`` must still mean the number."""
    from tal_models.presets import load_preset

    assert (
        main(["train", "--config", "demo-tridet", "--set", "optim.lr=3e-4", "--set", "detector.loss.loss_weight=2E0", "--print-config"])
        == 0
    )
    path = tmp_path / "effective.yaml"
    path.write_text(capsys.readouterr().out)
    printed = load_preset(path)
    assert printed.optim.lr == 3e-4 and printed.detector.loss.loss_weight == 2.0
