"""Every command reports a mistake the same way: `hvd-yolo CMD: error: ...`, exit 2, no traceback.

Each case is a bad input found before any work, run as users run it (the installed script).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvd_yolo import cli
from hvd_yolo.launch import hvd_yolo_argv

# command -> (argv with {tmp} for the test's folder, the error's expected start)
BAD_INPUTS: dict[str, tuple[list[str], str]] = {
    "env": (["env", "--json", "{tmp}/bad.yaml/env.json"],
            "hvd-yolo env: error: --json {tmp}/bad.yaml/env.json: cannot write"),
    "convert": (["convert", "yolo", "{tmp}/missing", "{tmp}/out"],
                "hvd-yolo convert: error: {tmp}/missing: no such file or directory"),
    "shards": (["shards", "verify", "{tmp}/missing"],
               "hvd-yolo shards verify: error: {tmp}/missing: no such directory"),
    "model": (["model", "info", "--size", "100"], "hvd-yolo model info: error: "),
    "train": (["train", "--config", "{tmp}/bad.yaml"],
              "hvd-yolo train: error: {tmp}/bad.yaml: not valid YAML"),
    "eval": (["eval", "--checkpoint", "{tmp}/missing.pt", "--data", "{tmp}"],
             "hvd-yolo eval: error: {tmp}/missing.pt: no such checkpoint file"),
    "export": (["export", "{tmp}/missing.pt", "--format", "onnx", "--out", "{tmp}/m.onnx"],
               "hvd-yolo export: error: {tmp}/missing.pt: no such checkpoint file"),
    "detect": (["detect", "--checkpoint", "{tmp}/missing.pt", "{tmp}/missing", "--out",
                "{tmp}/d.json"], "hvd-yolo detect: error: "),
    "bench": (["bench", "train", "--size", "100"],
              "hvd-yolo bench train: error: --size must be a positive multiple of 32, got 100"),
    "demo": (["demo", "--size", "100", "--out", "{tmp}/demo"],
             "hvd-yolo demo: error: --size must be a positive multiple of 32, got 100"),
    "cluster": (["cluster", "start", "abc", "--name", "clitest"],
                "hvd-yolo cluster start: error: node must be a number 1..N, got 'abc'"),
}


@pytest.mark.parametrize("command", sorted(BAD_INPUTS))
def test_bad_input_reported_argparse_style(command: str, tmp_path: Path) -> None:
    argv, expected = BAD_INPUTS[command]
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run(hvd_yolo_argv(*argv), capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert errors[0].startswith(expected.replace("{tmp}", str(tmp_path))), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "demo").exists()  # refused before any work


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-command parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_option_names_agree(command: str) -> None:
    """`--json PATH` ('-': stdout) and `--batch-size` wherever a command has them."""
    for parser in _parsers(cli.build_parser(command)):
        for action in parser._actions:
            assert "--batch" not in action.option_strings, parser.prog
            if "--json" in action.option_strings:
                assert action.nargs is None and action.const is None, parser.prog  # takes PATH
                assert "'-'" in action.help, parser.prog


def test_json_dash_is_stdout_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["model", "info", "--model", "yolov3-tiny", "--classes", "3", "--size", "64"]
    assert cli.main([*argv, "--json", "-"]) == 0
    figures = json.loads(capsys.readouterr().out)  # nothing but the JSON
    assert cli.main([*argv, "--json", str(tmp_path / "m.json")]) == 0
    assert "parameters:" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text()) == figures


def test_version_and_user_help(capsys: pytest.CaptureFixture) -> None:
    from hvd_yolo import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"hvd-yolo {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in cli.COMMANDS) and "hvd_yolo" not in text


def test_print_config_reads_back(tmp_path: Path) -> None:
    """The printed config is YAML that --config reads back, with --set applied and comments."""
    from hvd_yolo import config

    (tmp_path / "mine.yaml").write_text("optim: {epochs: 3}\n")
    proc = subprocess.run(hvd_yolo_argv("train", "--print-config", "--config", "mine.yaml",
                                        "--set", "optim.lr=0.02"),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "  lr: 0.02  # per-rank learning rate" in proc.stdout
    assert "  hsv: [0.015, 0.7, 0.4]  # hue, saturation, value gains" in proc.stdout
    (tmp_path / "all.yaml").write_text(proc.stdout)
    expected = config.load(tmp_path / "mine.yaml", ["optim.lr=0.02"], check=False)
    assert config.load(tmp_path / "all.yaml", check=False) == expected
    assert expected.optim.epochs == 3
    help_text = subprocess.run(hvd_yolo_argv("train", "--help"), capture_output=True, text=True,
                               timeout=120).stdout
    assert "--print-config" in help_text and "config.py" not in help_text
