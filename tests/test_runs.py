"""runs.run_config: the config `diffuse train` and the Python API start a run with, from settings
given by name; and the flags-to-overrides round trip it is fed from (config.add_config_flags)."""

import argparse
import json
import re

import pytest

from diffuse.config import add_config_flags, overrides_from_flags
from diffuse.errors import DiffuseError
from diffuse.runs import run_config


def test_flags_become_overrides_and_only_given_flags_count():
    p = argparse.ArgumentParser()
    add_config_flags(p)
    args = p.parse_args(["--lr", "1e-3", "--data", "mnist", "--no-scale-shift", "--channel-mult", "1,2"])
    assert overrides_from_flags(args) == {"train": {"lr": 1e-3}, "data": {"name": "mnist"},
                                          "model": {"scale_shift": False, "channel_mult": "1,2"}}
    assert overrides_from_flags(p.parse_args([])) == {}
    assert overrides_from_flags({"train.steps": 5, "out": "x"}) == {"train": {"steps": 5}}


def test_settings_win_over_the_config_file_which_wins_over_the_preset(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"lr": 5e-4, "batch_size": 16}}))
    cfg = run_config({"train": {"batch_size": 8}}, preset="mnist", config=f)
    assert (cfg.preset, cfg.train.lr, cfg.train.batch_size) == ("mnist", 5e-4, 8)
    assert cfg.train.steps == 4000                              # the preset's, not the dataclass default


def test_without_out_a_run_gets_a_timestamped_directory_under_runs():
    cfg = run_config(preset="digits")
    assert re.fullmatch(r"runs/digits-\d{8}-\d{6}", cfg.train.out), cfg.train.out
    assert run_config({"train": {"out": "here"}}).train.out == "here"


@pytest.mark.parametrize("kw", [{"preset": "digits"}, {"config": "c.json"}, {"init_from": "ckpt"}])
def test_resume_refuses_what_would_reconfigure_the_run(kw):
    with pytest.raises(DiffuseError, match="drop --preset/--config/--init-from"):
        run_config(resume="runs/x", **kw)


def test_resume_reads_the_run_directory(tmp_path):
    with pytest.raises(DiffuseError, match="not a run directory"):
        run_config(resume=tmp_path)


def test_the_overrides_passed_in_are_not_changed(tmp_path):
    overrides = {"train": {"lr": 1e-3}}
    with pytest.raises(DiffuseError):
        run_config(overrides, resume=tmp_path)
    assert overrides == {"train": {"lr": 1e-3}}
