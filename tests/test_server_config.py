"""Federation TOML: defaults load, overrides apply key by key, mistakes are one-line errors."""

import pytest

from stamen.core.errors import UserError
from stamen.core.model import PRESETS
from stamen.server.config import load_config


def write(tmp_path, text):
    p = tmp_path / "fed.toml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    base = load_config()
    assert base.aggregation.buffer_k == 4 and base.aggregation.outer == "nesterov"
    cfg = load_config(write(tmp_path, "[aggregation]\nbuffer_k = 2\n[tiers.laptop]\nsteps = 3\nwidth = 1\n"
                                      "[tiers.edge]\nsteps = 2\nblocks = [0]\n"))
    assert cfg.aggregation.buffer_k == 2 and cfg.aggregation.tau_max == base.aggregation.tau_max
    assert cfg.tiers["laptop"].steps == 3 and cfg.tiers["laptop"].batch_size == base.tiers["laptop"].batch_size
    plans = {t: p for t, (p,) in cfg.plans(PRESETS["gpt-tiny"]).items()}  # one plan per tier
    assert plans["laptop"].width == 1.0 and plans["edge"].blocks == (0,)
    assert cfg.train_config("gpu").lr == base.tiers["gpu"].lr
    # A tier the packaged table lacks starts from the laptop tier as configured, settings and plan alike.
    assert cfg.tiers["edge"].batch_size == cfg.tiers["laptop"].batch_size and cfg.tiers["edge"].steps == 2
    assert (plans["edge"].width, plans["edge"].train) == (plans["laptop"].width, plans["laptop"].train)


def test_window_override_gives_a_window_plan(tmp_path):
    cfg = load_config(write(tmp_path, "[tiers.phone-low]\nwindow = 2\n"))
    (plan,) = cfg.plans(PRESETS["gpt-tiny"])["phone-low"]
    assert (plan.blocks, plan.width, plan.train) == ((0, 1, 2, 3), 1.0, ("blocks.2.*", "blocks.3.*"))
    with pytest.raises(UserError, match="window must be 1 to 4"):
        load_config(write(tmp_path, "[tiers.phone-low]\nwindow = 5\n")).plans(PRESETS["gpt-tiny"])
    with pytest.raises(UserError, match=r"\[tiers.laptop\].*window .*excludes blocks"):
        load_config(write(tmp_path, "[tiers.laptop]\nwindow = 1\nwidth = 1\n"))
    with pytest.raises(UserError, match="window must be at least 1"):
        load_config(write(tmp_path, "[tiers.laptop]\nwindow = 0\n"))


def test_rotate_gives_every_window_position(tmp_path):
    cfg = load_config(write(tmp_path, "[tiers.phone-low]\nwindow = 2\nrotate = true\n"))
    plans = cfg.plans(PRESETS["gpt-tiny"])
    assert [p.train for p in plans["phone-low"]] == [
        ("wte.*", "wpe.*", "blocks.0.*", "blocks.1.*", "ln_f.*", "lm_head.*"), ("blocks.1.*", "blocks.2.*"),
        ("blocks.2.*", "blocks.3.*")]
    assert len(plans["laptop"]) == 1
    with pytest.raises(UserError, match=r"\[tiers.laptop\].*rotate needs window"):
        load_config(write(tmp_path, "[tiers.laptop]\nrotate = true\n"))
    with pytest.raises(UserError, match=r"\[tiers.gpu\] rotate: only a device tier"):
        load_config(write(tmp_path, "[tiers.gpu]\nwindow = 2\nrotate = true\n"))


def test_max_tokens_reaches_the_aggregator(tmp_path):
    assert load_config().aggregator_config().max_tokens is None
    cfg = load_config(write(tmp_path, "[aggregation]\nmax_tokens = 4096\n"))
    assert cfg.aggregator_config().max_tokens == 4096


@pytest.mark.parametrize("text, message", [
    ("[aggregation]\nbufer_k = 2\n", "unknown key 'bufer_k'"),
    ("[aggregaton]\n", "unknown section"),
    ("[aggregation]\nbuffer_k = 'four'\n", "wrong type"),
    ("[aggregation]\nbuffer_k = 0\n", r"\[aggregation\]: buffer_k and min_quorum must be >= 1"),
    ("[aggregation]\nouter = 'sgd'\n", "outer optimizer 'sgd'"),
    ("[aggregation]\nmode = 'rounds'\n", "needs tau_max = 0"),
    ("[aggregation]\nmax_tokens = -1\n", "max_tokens"),
    ("[tiers.edge]\nsteps = 'x'\n", r"\[tiers.edge\] steps: 'x' has the wrong type"),
    ("[tiers.gpu]\noptimizer = 'lion'\n", "unknown optimizer"),
    ("[tiers.gpu]\nsteps = 0\n", "steps and batch_size"),
    ("[server\n", "federation config"),
    ("[aggregation]\ncombine = 'add'\n", 'combine = "add" needs the mean defence rule'),
    ("[aggregation]\npaced_by = ['gpus']\n", "paced_by: unknown tier 'gpus'"),
    ("[aggregation]\nmode = 'rounds'\ntau_max = 0\npaced_by = ['gpu']\n", "leave paced_by empty"),
    ("[lora]\nrank = 8\nbase = 'nf4'\n", r"\[lora\].*fp32, bf16, int8 \(nf4 is for `stamen plans` only"),
])
def test_bad_settings_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as e:
        load_config(write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_add_loads_with_the_mean_defence_rule(tmp_path):
    # [aggregation] is judged on its own and against [defence] once both are read: a file that
    # sets combine = "add" and rule = "mean" loads whatever the packaged rule is.
    cfg = load_config(write(tmp_path, "[aggregation]\ncombine = 'add'\n[defence]\nrule = 'mean'\n"))
    assert cfg.aggregator_config().combine == "add" and cfg.aggregator_config().defence.rule == "mean"


def test_missing_file():
    with pytest.raises(UserError, match="not found"):
        load_config("/nonexistent/fed.toml")
