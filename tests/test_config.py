from pathlib import Path

import pytest
from omegaconf import OmegaConf

from train.config import ConfigError, load_config, save_config


def test_base_config_is_the_embedded_default():
    cfg = load_config()
    assert cfg.model.preset == "tiny" and cfg.data.source == "shapes"


def test_unknown_cli_key_names_the_key_and_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.max_step'.*did you mean 'train\.max_steps'"):
        load_config(overrides=["train.max_step=3"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  resolutoin: 64\n")
    with pytest.raises(ConfigError, match=r"'data\.resolutoin' in .*bad\.yaml.*'data\.resolution'"):
        load_config([str(bad)])


def test_later_files_and_overrides_win(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  lr: 0.5\n  batch_size: 3\n")
    b.write_text("train:\n  lr: 0.25\n")
    cfg = load_config([str(a), str(b)], ["train.batch_size=7"])
    assert (cfg.train.lr, cfg.train.batch_size) == (0.25, 7)


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=fast"], r"train\.lr"),
    (["model.pretrained=/x"], r"exactly one of model\.pretrained"),
    (["train.resume=latest", "model.init_from=/x"], r"init_from"),
    (["data.source=imagefolder"], r"needs data\.path"),
    (["data.resolution=30"], r"multiple of 8"),
    (["validation.every=5", "validation.prompts=[]"], r"validation\.prompts"),
    (["train.mixed_precision=fp8"], r"mixed_precision"),
    (["mitigate.weights.dedup_regions=true", "mitigate.weights.region_tiles=5"], r"region_tiles must divide"),
    (["mitigate.weights.region_scope=pixels"], r"region_scope must be region or image"),
    (["mitigate.weights.region_dilate=-1"], r"region_dilate must be >= 0"),
    (["mitigate.weights.dedup_max_distance=1.5"], r"dedup_max_distance must be in \[0, 1\]"),
    (["mitigate.weights.dedup_by=sample"], r"dedup_by must be loss, sampling or caption"),
    (["mitigate.weights.dedup_min_t=-1"], r"dedup_min_t must be >= 0"),
    (["mitigate.weights.dedup_by=sampling"], r"dedup_by=sampling acts on row weights"),
    (["trainlr=1"], r"not of the form|unknown config key 'trainlr'"),
])
def test_incompatible_or_bad_settings_fail_at_start(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_saved_config_has_no_secrets(tmp_path):
    # what a careless user config could hold, in any nesting
    cfg = OmegaConf.create({"logging": {"run_name": "x", "wandb_api_key": "hunter2"}, "hub_token": "hf_abc",
                            "mitigate": {"regularize": {"start_token": 0.5}, "captions": {"add_tokens": 2}}})
    save_config(cfg, tmp_path / "c.yaml")
    text = Path(tmp_path / "c.yaml").read_text()
    assert "hunter2" not in text and "hf_abc" not in text and "run_name: x" in text
    assert "start_token: 0.5" in text and "add_tokens: 2" in text  # config that merely mentions tokens stays


def test_free_form_dict_sections_accept_their_own_keys(tmp_path):
    cfg = load_config(overrides=["monitor.signal_weights.loss=2.0"])
    assert cfg.monitor.signal_weights["loss"] == 2.0
    with pytest.raises(ConfigError, match="monitor.signal_weight"):
        load_config(overrides=["monitor.signal_weight.loss=2.0"])
