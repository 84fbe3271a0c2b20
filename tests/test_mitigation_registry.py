"""Adding a mitigation is one file (its config dataclass and its class) and a registry line; the
loop does not change. The toy here drops every sample of one rank, which is also the hardest
case for DDP: that rank's backward must still run, or the other rank waits forever."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from conftest import fast_overrides, read_metrics, run_on_two_ranks

from train.mitigate import REGISTRY, Mitigation, MitigationStep


@dataclass
class DropRankConfig:
    rank: int = -1  # the rank whose samples all train at weight 0; -1 = off


class DropRank(Mitigation):
    name = "drop_rank"
    Config = DropRankConfig

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.rank >= 0

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.dropped, self.seen = 0, 0

    def weights(self, step: MitigationStep) -> Optional[torch.Tensor]:
        me = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        weights = torch.zeros(len(step.flagged)) if me == self.cfg.rank else torch.ones(len(step.flagged))
        self.dropped += int((weights == 0).sum())
        self.seen += len(weights)
        return weights

    def metrics(self) -> dict[str, tuple[float, float]]:
        out = {"mitig/dropped_share": (self.dropped, self.seen)}
        self.dropped, self.seen = 0, 0
        return out


def register() -> None:
    REGISTRY["drop_rank"] = DropRank  # the registry line a new mitigation adds


def test_a_registered_mitigation_brings_its_config_section(monkeypatch):
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="unknown config key 'mitigate.drop_rank'"):
        load_config(overrides=["mitigate.drop_rank.rank=0"])
    monkeypatch.setitem(REGISTRY, "drop_rank", DropRank)
    assert load_config(overrides=["mitigate.drop_rank.rank=0"]).mitigate.drop_rank.rank == 0


def _train_dropping_rank_one(cache_dir: str, out: str) -> None:
    from train.finetune import main

    register()
    main(fast_overrides(cache_dir, out, **{"train.max_steps": 4, "train.checkpoint_every": 2,
                                           "mitigate.drop_rank.rank": 1}))


def test_the_trainer_with_every_sample_of_one_rank_dropped_keeps_ddp_in_step(tmp_path, cache_dir):
    run = tmp_path / "drop"
    run_on_two_ranks("test_mitigation_registry", "_train_dropping_rank_one", str(cache_dir), str(run))
    rows = read_metrics(run)
    logged = [r for r in rows if "mitig/mean_weight" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    # batch metrics are reduced over both ranks: rank 0 alone would report 1.0 and 0.0
    assert all(r["mitig/mean_weight"] == 0.5 and r["mitig/dropped_share"] == 0.5 for r in logged)
    assert all(r["dist/weights_divergence"] == 0.0 for r in rows if "dist/weights_divergence" in r)
    assert (run / "final" / "model_index.json").is_file()


def test_a_mitigation_must_say_when_it_is_active():
    class Incomplete(Mitigation):  # no active(): the loop could not tell whether to build it
        name = "incomplete"
        Config = DropRankConfig

    with pytest.raises(TypeError, match="active"):
        Incomplete(None, None)
