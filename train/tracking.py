"""Metrics: ``metrics.jsonl`` always (the source of truth tests and tools read), W&B when enabled.

Only the main process writes. Keys are namespaced (``train/``, ``perf/``, ``memo/``, ``mitig/``,
``eval/``, ``val/``). The W&B run id is kept in the run directory so a resumed run continues the
same W&B run, and ``metrics.jsonl`` drops rows past the resumed step so history is not doubled.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from train.config import to_container
from train.util import jsonable, write_atomic

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, cfg: DictConfig, output_dir: Path, is_main: bool, resume_step: Optional[int] = None):
        self.is_main = is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not is_main:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        if cfg.logging.wandb:
            self.wandb_run = self._init_wandb(cfg, Path(output_dir))

    def _truncate_after(self, step: int) -> None:
        """Steps after the checkpoint will be trained again: keep their first record only.

        A line that does not parse is dropped with a warning: the last one is torn when a run
        dies mid-write (full disk, power loss); any other was damaged some other way."""
        if not self.path.is_file():
            return
        lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row_step = float(json.loads(line).get("step", 0))
            except (ValueError, AttributeError, TypeError):  # not JSON, not an object, no number
                torn = "torn last line" if number == len(lines) else "damaged line"
                log.warning("%s:%d: dropping a %s (%r)", self.path, number, torn, line[:80])
                continue
            if row_step <= step:
                kept.append(line)
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def _init_wandb(self, cfg: DictConfig, output_dir: Path):
        import wandb

        id_file = output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        mode = cfg.logging.wandb_mode or os.environ.get("WANDB_MODE") or "offline"
        return wandb.init(
            project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
            name=cfg.logging.run_name or output_dir.name, id=run_id, resume="allow",
            dir=str(output_dir), mode=mode, config=to_container(cfg),
            group=cfg.logging.wandb_group, job_type=cfg.logging.wandb_job_type,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        row = {"step": step, **jsonable(metrics)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_images(self, key: str, images: list[tuple[Any, str]], step: int) -> None:
        """``images``: (PIL image or path, caption) pairs; files on disk are the record, W&B shows them."""
        if not self.is_main or self.wandb_run is None or not images:
            return
        import wandb

        self.wandb_run.log({key: [wandb.Image(img if not isinstance(img, Path) else str(img), caption=cap)
                                  for img, cap in images]}, step=step)

    def log_histograms(self, values: dict[str, Any], step: int) -> None:
        """Distributions (W&B histograms); metrics.jsonl keeps only the scalars."""
        if not self.is_main or self.wandb_run is None:
            return
        import wandb

        self.wandb_run.log({k: wandb.Histogram(v) for k, v in values.items() if len(v)}, step=step)

    def log_table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        """A W&B table; values that are images (PIL, or datasets' {"path"/"bytes"} dicts) become wandb.Image."""
        if not self.is_main or self.wandb_run is None or not rows:
            return
        import io

        import wandb
        from PIL import Image

        def cell(value: Any) -> Any:
            if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
                value = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
            return wandb.Image(value) if isinstance(value, Image.Image) else value

        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[cell(r.get(c)) for c in columns] for r in rows])
        self.wandb_run.log({key: table}, step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
