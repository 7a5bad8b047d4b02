"""Config values are coerced to and checked against their field's type when the config is built."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hvd_yolo import config
from hvd_yolo.config import ConfigError
from hvd_yolo.launch import hvd_yolo_argv


def load(*overrides: str, path: Path | None = None) -> config.Config:
    return config.load(path, ["data.train=shards", *overrides])


def error(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load(*overrides, path=path)
    return str(e.value)


def test_floats_from_strings_and_ints() -> None:
    # PyYAML reads 1e-3 (no dot) as a string: it must become the float 0.001
    cfg = load("optim.lr=1e-3", "eval.conf_thres=1e-3", "optim.momentum=0")
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.eval.conf_thres == 0.001
    assert cfg.optim.momentum == 0.0 and isinstance(cfg.optim.momentum, float)
    msg = error("optim.lr=fast")
    assert msg == "optim.lr='fast': expected a number, got str 'fast'"
    assert "optim.lr" in error("optim.lr=nan") and "optim.lr=True" in error("optim.lr=true")


def test_yaml_file_values_are_coerced(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  batch_size: 4.0\neval:\n  conf_thres: 5e-2\n")
    cfg = load(path=path)
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.eval.conf_thres) == (0.001, 4, 0.05)
    assert isinstance(cfg.optim.batch_size, int)
    path.write_text("optim:\n  batch_size: eight\n")
    assert error(path=path) == "optim.batch_size='eight': expected an integer, got str 'eight'"
    path.write_text("optim: 0.01\n")
    assert "config section 'optim' must be a mapping" in error(path=path)
    path.write_text("optim: [\n")
    assert f"{path}: not valid YAML" in error(path=path)


def test_ints_bools_strings() -> None:
    assert load("optim.batch_size=16.0").optim.batch_size == 16
    assert error("optim.batch_size=2.5") == "optim.batch_size=2.5: expected an integer, got float 2.5"
    assert "optim.epochs=True: expected an integer" in error("optim.epochs=true")
    assert load("optim.ema=no").optim.ema is False
    assert load("run.tensorboard=1").run.tensorboard is True
    assert error("optim.ema=2") == "optim.ema=2: expected a boolean (true/false), got int 2"
    # string keys take --set text as given: a folder named 2024, not the int 2024
    assert load("data.train=2024").data.train == "2024"
    with pytest.raises(ConfigError, match=r"^model.name=\['a'\]: expected a string, got list"):
        config.from_dict({"model": {"name": ["a"]}})


def test_optional_and_tuple() -> None:
    assert load("dist.threads=null").dist.threads is None
    assert load("dist.threads=4").dist.threads == 4
    assert load("data.val=null").data.val is None
    assert load("data.val=123").data.val == "123"
    assert error("dist.threads=many") == ("dist.threads='many': expected an integer or null, "
                                          "got str 'many'")
    assert load("augment.hsv=[0.1, 0.2, 0.3]").augment.hsv == (0.1, 0.2, 0.3)
    assert load("augment.hsv=0,1e-1,0.5").augment.hsv == (0.0, 0.1, 0.5)
    assert "augment.hsv=[0.1, 0.2]: expected a list of 3 values" in error("augment.hsv=[0.1, 0.2]")
    assert "augment.hsv=" in error("augment.hsv=[a, b, c]")


def test_ranges_and_choices() -> None:
    assert error("eval.conf_thres=2") == "eval.conf_thres=2.0: must be in [0, 1)"
    assert error("optim.lr=0") == "optim.lr=0.0: must be > 0"
    assert error("augment.hsv=[0.1, -1, 0]") == "augment.hsv=(0.1, -1.0, 0.0): must be >= 0"
    assert error("data.workers=-1") == "data.workers=-1: must be >= 0"
    assert ("dist.compression='fp8': must be one of ['fp16', 'none', 'powersgd']"
            in error("dist.compression=fp8"))
    assert ("dist.powersgd_warmup_compression='powersgd': must be one of ['fp16', 'none']"
            in error("dist.powersgd_warmup_compression=powersgd"))
    assert "data.on_corrupt='ignore'" in error("data.on_corrupt=ignore")
    assert "optim.name='lamb'" in error("optim.name=lamb")
    assert "unknown key(s) ['lr_max']" in error("optim.lr_max=1")
    assert "expected section.key=value" in error("optim.lr")


def test_train_reports_config_errors_argparse_style(tmp_path: Path) -> None:
    """`hvd-yolo train` exits 2 with one `hvd-yolo train: error:` line, no traceback."""
    proc = subprocess.run(hvd_yolo_argv("train", "--set", "data.train=x", "--set", "optim.lr=abc"),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("hvd-yolo train: error: optim.lr='abc': expected a number, "
                                   "got str 'abc'")
    assert "Traceback" not in proc.stderr + proc.stdout
