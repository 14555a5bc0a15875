"""Training logs: a plain-text log file, and a wandb run when one is configured (wandb is optional)."""
import dataclasses
import logging
import math
import os
import sys
from typing import Literal, Mapping, Optional

from .config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class MetricsConfig(Config):
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    # wandb is used only when a project is set and the mode is not 'disabled'; 'offline' writes the run to disk.
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"

    def __post_init__(self):
        super().__post_init__()
        if self.wandb_mode != "disabled" and not self.wandb_project:
            raise ConfigError(f"wandb_mode is '{self.wandb_mode}' but wandb_project is not set")


class MetricLogger:
    """Writes `log.txt` in `directory` (messages and one `step=... key=value` line per update) and mirrors the
    metrics to wandb when configured. Only the main process logs; elsewhere every method is a no-op."""

    def __init__(self, config: MetricsConfig, directory: str, run_name: str, enabled: bool,
                 run_id: Optional[str] = None, run_config: Optional[Mapping] = None):
        self.enabled = enabled
        self.run_id = run_id
        self._wandb = None
        self._logger = logging.getLogger(f"warpcore.{run_name}.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        if not enabled:
            self._logger.addHandler(logging.NullHandler())  # not even warnings: the main process reports them
            return
        os.makedirs(directory, exist_ok=True)
        console = logging.StreamHandler(sys.stderr)
        console.addFilter(lambda record: not getattr(record, "metrics", False))  # the progress bar shows those
        for handler in (logging.FileHandler(os.path.join(directory, "log.txt")), console):
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self._logger.addHandler(handler)
        if config.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError as e:
                raise ImportError(f"wandb_mode is '{config.wandb_mode}' but wandb is not installed: "
                                  f"pip install wandb, or set wandb_mode: disabled") from e
            self.run_id = run_id or wandb.util.generate_id()
            wandb.init(project=config.wandb_project, entity=config.wandb_entity, name=run_name, id=self.run_id,
                       resume="allow", mode=config.wandb_mode, dir=directory, config=dict(run_config or {}))
            self._wandb = wandb
        elif config.wandb_project:
            self.info("wandb_project is set but wandb_mode is 'disabled': not logging to wandb")

    def info(self, message: str):
        self._logger.info(message)

    def warning(self, message: str):
        self._logger.warning(message)

    def log(self, step: int, metrics: Mapping[str, float]):
        """One line per update; floats in full precision (repr), so runs can be compared exactly."""
        if not self.enabled:
            return
        self._logger.info(" ".join([f"step={step}"] + [f"{k}={v!r}" for k, v in metrics.items()]),
                          extra={"metrics": True})
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if not math.isnan(v)}, step=step)

    def log_image(self, step: int, key: str, path: str):
        if self.enabled:
            self.info(f"{key} of step {step} written to {path}")
            if self._wandb is not None:
                self._wandb.log({key: self._wandb.Image(path)}, step=step)

    def close(self):
        for handler in list(self._logger.handlers):
            handler.close()
            self._logger.removeHandler(handler)
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_log(path: str) -> dict:
    """{step: {key: value}} from the metric lines of a `log.txt` (a later line for the same step wins)."""
    steps = {}
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            if len(fields) > 1 and fields.get("step", "").isdigit():
                steps[int(fields.pop("step"))] = {k: float(v) for k, v in fields.items()}
    return steps
