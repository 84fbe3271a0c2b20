from pathlib import Path

import pytest
from omegaconf import OmegaConf

from train.config import ConfigError, load_config, save_config


def test_the_embedded_default_is_the_demo_and_the_tests_use_their_own_base():
    from train.config import BASE_CONFIG, REPO_ROOT

    assert BASE_CONFIG == REPO_ROOT / "tests" / "base.yaml"  # set by conftest before train.config is imported
    cfg = load_config()
    assert cfg.model.preset == "tiny" and cfg.data.source == "shapes"
    demo = load_config(base=REPO_ROOT / "configs" / "base.yaml")
    assert (demo.model.pretrained, demo.data.path, demo.monitor.label_column) == (
        "data/testbed/models/openmoji-base", "data/demo", "group")
    assert (REPO_ROOT / demo.model.pretrained / "model_index.json").is_file()
    assert (REPO_ROOT / demo.data.path / "metadata.jsonl").is_file()


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
    (["mitigate.dedup.regions=true", "mitigate.dedup.region_tiles=5"], r"region_tiles \(5\) must divide"),
    (["mitigate.dedup.region_scope=pixels"], r"region_scope='pixels' is not allowed; choose one of 'region', 'image'"),
    (["mitigate.dedup.region_dilate=-1"], r"region_dilate=-1 is out of range: must be >= 0"),
    (["mitigate.dedup.max_distance=1.5"], r"max_distance=1.5 is out of range: must be >= 0.0 and <= 1.0"),
    (["mitigate.dedup.by=sample"], r"dedup.by='sample' is not allowed; choose one of 'loss', 'sampling', 'caption'"),
    (["mitigate.dedup.min_t=-1"], r"min_t=-1 is out of range"),
    (["mitigate.dedup.by=sampling"], r"dedup.by=sampling acts on row weights"),
    (["mitigate.dedup.images=true", "mitigate.dedup.embedding=sscd-torchscript"],
     r"mitigate\.dedup\.embedding=sscd-torchscript needs mitigate\.dedup\.sscd_model"),
    (["mitigate.dedup.embedding=clip"], r"embedding='clip' is not allowed"),
    (["monitor.signals=[loss,neighbours]", "monitor.neighbours.embedding=sscd-torchscript"],
     r"monitor\.neighbours\.embedding=sscd-torchscript needs monitor\.neighbours\.sscd_model"),
    (["mitigate.weights.mode=drop", "monitor.enabled=false"], r"mitigate.weights acts on the monitor's flags"),
    (["eval.region_map=bright"], r"region_map must be one of \('be_magnitude', 'be'\)"),
    (["mitigate.weights.mode=group"], r"mode=group reads the look-alike groups.*add it to monitor\.signals"),
    (["monitor.flag.policy=calibrated", "monitor.detector=weighted"], r"policy=calibrated flags by the detector heads"),
    (["monitor.detector=heads", "monitor.flag.policy=calibrated", "monitor.flag.probability=0.4"],
     r"probability_off must be <= monitor\.flag\.probability"),
    # numbers that torch would only reject later, or never (issue 20)
    (["train.lr=nan"], r"train\.lr=nan must be a finite number"),
    (["train.lr=inf"], r"train\.lr=inf must be a finite number"),
    (["train.adam_beta1=5"], r"train\.adam_beta1=5.0 is out of range: must be >= 0.0 and < 1.0"),
    (["data.num_workers=-1"], r"data\.num_workers=-1 is out of range: must be >= 0"),
    (["train.lr_warmup_steps=-10"], r"train\.lr_warmup_steps=-10 is out of range"),
    (["train.ema_decay=2"], r"train\.ema_decay=2.0 is out of range: must be >= 0.0 and <= 1.0"),
    (["mitigate.weights.factor=-3"], r"mitigate\.weights\.factor=-3.0 is out of range"),
    (["train.max_grad_norm=nan"], r"train\.max_grad_norm=nan must be a finite number"),
    (["data.on_bad_sample=ignore"], r"data\.on_bad_sample='ignore' is not allowed; choose one of 'skip', 'error'"),
    (["train.resume=latest", "overwrite=true"], r"overwrite=true moves it aside"),
    (["train.mixed_precision=no"], r"mixed_precision='False' is not allowed.*quote it"),
    (["trainlr=1"], r"not of the form|unknown config key 'trainlr'"),
])
def test_incompatible_or_bad_settings_fail_at_start(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_a_section_given_as_a_plain_value_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"config key 'train' in .*bad\.yaml is a section: give it as a mapping"):
        load_config([str(bad)])


def test_credentials_inside_values_are_redacted(tmp_path):
    """Not only secret-named keys: a token inside a URL or a shard command is redacted too."""
    cfg = OmegaConf.create({"data": {"path": "pipe:curl -s -H 'Authorization: Bearer hf_SECRET1' https://x/{0..3}.tar",
                                     "other": "https://alice:SECRET2@host.example/data?X-Amz-Signature=SECRET3&a=1",
                                     "cmd": "HF_TOKEN=SECRET4 aws s3 cp s3://b/x - --token SECRET5",
                                     "plain": "https://host.example/data/{000..009}.tar"}})
    save_config(cfg, tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    for secret in ("SECRET1", "SECRET2", "SECRET3", "SECRET4", "SECRET5"):
        assert secret not in text
    assert "https://host.example/data/{000..009}.tar" in text and "a=1" in text and "alice" in text


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


@pytest.mark.parametrize("model", ["sd15", "sd21"])
def test_real_checkpoint_configs_undo_the_embedded_demo(model):
    """Layered over the demo base, a real fine-tune must not inherit its data filter, its
    ground-truth column, its end-of-run eval or its text-encoder training."""
    from train.config import REPO_ROOT

    cfg = load_config([str(REPO_ROOT / "configs" / "model" / f"{model}.yaml")], ["data.path=/data/mine"],
                      base=REPO_ROOT / "configs" / "base.yaml")
    assert cfg.data.filter_column is None and cfg.monitor.label_column is None and cfg.eval.every == 0
    assert not cfg.train.text_encoder and cfg.eval.stratify_column is None
    assert cfg.monitor.detector == "heads" and cfg.monitor.flag.policy == "calibrated"


TRAINER_OVERLAYS = sorted(
    [p for d in ("model", "monitor", "mitigation") for p in (Path(__file__).parents[1] / "configs" / d).glob("*.yaml")]
    + [Path(__file__).parents[1] / "configs" / "testbed" / f"{n}.yaml" for n in ("common", "finetune", "model_v6", "pretrain")])


@pytest.mark.parametrize("overlay", TRAINER_OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_overlay_is_a_valid_trainer_config(overlay):
    assert overlay.is_file()
    load_config([str(overlay)])  # unknown keys, bad values and invalid combinations raise ConfigError
