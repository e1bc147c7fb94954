"""Campaign files: validated before Ray starts (unknown keys rejected, errors name the field)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from oscqat.config import (FIELD_ALIASES, ConfigError, DatasetName, TrainConfig, check_arch, load_yaml_mapping,
                           parse_bits, validate_config)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# TrainConfig fields the campaign controls itself, so `base` may not set them.
_CAMPAIGN_OWNED = {"arch", "bits", "epochs", "seed", "dataset"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Target(_Strict):
    """One (architecture, bit-width): its own Optuna study and MLflow parent run."""

    arch: str
    bits: str
    space: str | None = None  # overrides the campaign's space for this target
    pretrained: str | None = None  # FP checkpoint path; else one is trained once per campaign

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: str) -> str:
        wbits, _ = parse_bits(v)
        if wbits is None:
            raise ValueError("a search target must be quantized (e.g. w4a4), not fp32")
        return v.strip().lower()

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return check_arch(v)

    @property
    def slug(self) -> str:
        return f"{self.arch}-{self.bits}"

    @property
    def label(self) -> str:
        return f"{self.arch}/{self.bits}"


class Budget(_Strict):
    num_samples: int = Field(default=8, gt=0, le=100_000)
    max_epochs: int = Field(default=10, gt=0, le=10_000)
    # "auto": ASHA's first rung comes after the latest remedy start the space can sample has been
    # active a full epoch (search/rungs.py); an explicit value below that is refused unless
    # allow_early_rungs is set.
    grace_period: int | Literal["auto"] = Field(default="auto")
    allow_early_rungs: bool = False
    reduction_factor: float = Field(default=2.0, gt=1.0, le=100.0)
    time_budget_s: float | None = Field(default=None, gt=0)
    searcher: Literal["tpe", "random"] = "tpe"  # random: a baseline for comparing search strategies
    scheduler: Literal["asha", "fifo"] = "asha"  # fifo: every trial trains max_epochs (no early stopping)
    enqueue_starting_points: bool = True
    # TPE draws its first trials at random. Optuna's default is 10, so a 10-trial campaign never
    # models (docs/RESULTS.md measured it: TPE's winners were random search's). "auto" scales the
    # start-up to the budget: see startup_trials.
    tpe_startup_trials: int | Literal["auto"] = Field(default="auto")

    def startup_trials(self, n_points: int) -> int:
        """Trials TPE draws before it models: the enqueued starting points plus one random draw, or a
        third of the budget if more, never more than Optuna's default 10 (an explicit value wins)."""
        if self.tpe_startup_trials != "auto":
            return self.tpe_startup_trials
        return min(10, max(n_points + 1, self.num_samples // 3))

    @model_validator(mode="after")
    def _grace(self) -> "Budget":
        if self.tpe_startup_trials != "auto" and self.tpe_startup_trials < 0:
            raise ValueError(f"tpe_startup_trials must be >= 0 or 'auto', got {self.tpe_startup_trials}")
        if self.grace_period != "auto" and self.grace_period <= 0:
            raise ValueError(f"grace_period must be a positive number of epochs or 'auto', got {self.grace_period}")
        if self.grace_period != "auto" and self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) must not exceed max_epochs ({self.max_epochs})")
        return self


class Resources(_Strict):
    cpu: float = Field(default=1.0, gt=0, le=1024)
    gpu: float = Field(default=0.0, ge=0, le=64)


class FPPretrain(_Strict):
    """How the shared FP checkpoint is made when a target gives none."""

    epochs: int = Field(default=10, gt=0, le=10_000)
    lr: float = Field(default=0.05, gt=0, le=10.0)
    weight_decay: float = Field(default=5e-4, ge=0, le=1.0)


class Confirm(_Strict):
    """After a target's search, retrain its top-k configs with fresh seeds to the full budget.

    A best-of-N on one selection split is optimistic by selection bias and one seed is one draw;
    the confirmed winner is the config with the best *mean* selection value over these seeds.
    """

    top_k: int = Field(default=3, gt=0, le=100)
    seeds: int = Field(default=3, gt=0, le=100)


class MlflowSettings(_Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None  # default: the campaign name


class Campaign(_Strict):
    """A search campaign: targets x space x budget, and where everything is stored."""

    name: str
    targets: list[Target] = Field(min_length=1)
    dataset: DatasetName = "digits"
    base: dict[str, Any] = Field(default_factory=dict)
    space: str | None = None  # default: the target's arch
    budget: Budget = Field(default_factory=Budget)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent_trials: int | None = Field(default=None, gt=0, le=10_000)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)  # numpy and Optuna's samplers take 32-bit seeds
    ray_address: str | None = None
    storage_path: str = "./ray_results"
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    optuna_storage: str = "sqlite:///optuna.db"
    fp_pretrain: FPPretrain = Field(default_factory=FPPretrain)
    confirm: Confirm | None = Field(default_factory=Confirm)  # null: skip the confirm stage
    max_failures: int = Field(default=2, ge=0, le=100)
    checkpoints_to_keep: int = Field(default=2, gt=0, le=100)
    # A trial checkpoints at its last epoch and otherwise at most this often. Tune snapshots the
    # whole experiment (searcher included) every `checkpoints_to_keep` trial checkpoints, which
    # for second-long epochs cost more than the training; 0 = every epoch.
    checkpoint_interval_s: float = Field(default=10.0, ge=0, le=86_400)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("name must be 1-64 characters of letters, digits, '_', '-', '.' (starting alphanumeric)")
        return v

    @field_validator("base")
    @classmethod
    def _base(cls, v: dict) -> dict:
        owned = sorted(set(v) & _CAMPAIGN_OWNED)
        if owned:
            raise ValueError(f"base may not set {owned}: the campaign sets them (targets, budget.max_epochs, seed, dataset)")
        unknown = sorted(set(v) - set(TrainConfig.model_fields) - set(FIELD_ALIASES))
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "Campaign":
        labels = [t.label for t in self.targets]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"targets: duplicated target(s) {dupes}")
        for i, target in enumerate(self.targets):  # base must make a valid TrainConfig for each target
            try:
                self.train_config(target, {})
            except ConfigError as exc:  # name the target and each field: "targets[0] (arch/bits): pretrained: ..."
                fields = "; ".join(line.strip() for line in str(exc).splitlines()[1:])
                raise ValueError(f"targets[{i}] ({target.label}) with base: {fields}") from None
        return self

    # helpers -------------------------------------------------------------------
    def space_for(self, target: Target) -> str:
        return target.space or self.space or target.arch

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or self.name

    def train_config(self, target: Target, params: dict, epochs: int | None = None) -> TrainConfig:
        """Campaign base + target + sampled params -> a validated TrainConfig."""
        data = {**self.base, **params, "arch": target.arch, "bits": target.bits, "dataset": self.dataset,
                "epochs": epochs or self.budget.max_epochs, "seed": self.seed}
        if target.pretrained is not None:
            data["pretrained"] = target.pretrained
        return validate_config(TrainConfig, data, source=f"campaign {self.name!r} target {target.label}")

    def trial_config(self, target: Target, params: dict | None = None, fp_checkpoint: str | None = None) -> dict:
        """A trial's config as recorded (parent params, ``train_config.yaml``, ``report sync``):
        ``train_config`` with a local ``data_dir`` made absolute and ``pretrained`` the FP checkpoint
        the trial starts from. The trainable gets those weights with it and loads no file itself."""
        data = self.train_config(target, params or {}).model_dump(mode="json")
        if data.get("data_dir") and "://" not in str(data["data_dir"]):  # a URI is not a local path
            data["data_dir"] = str(Path(data["data_dir"]).expanduser().resolve())
        if fp_checkpoint:
            data["pretrained"] = fp_checkpoint
        return data

    def confirm_seeds(self) -> list[int]:
        """Fresh seeds for the confirm stage: never the search's own seed."""
        if self.confirm is None:
            return []
        return [self.seed + 1000 + i for i in range(self.confirm.seeds)]

    def study_name(self, target: Target) -> str:
        return f"{self.name}.{target.slug}"

    @property
    def remote_storage(self) -> bool:
        return "://" in self.storage_path

    def campaign_dir(self) -> Path:
        """Local folder for campaign.yaml, state.json and FP checkpoints.

        With cloud storage (s3://, gs://) it is ``./.oscqat/<name>``; Ray's trial state goes to
        ``ray_storage_path()`` either way.
        """
        if self.remote_storage:
            return Path(".oscqat").resolve() / self.name
        return Path(self.storage_path).expanduser().resolve() / self.name

    def ray_storage_path(self) -> str:
        """Where Ray Tune keeps this campaign's experiments (one folder per target)."""
        if self.remote_storage:
            return self.storage_path.rstrip("/") + "/" + self.name
        return str(self.campaign_dir())


def load_campaign(path: str | Path) -> Campaign:
    """Load and validate a campaign YAML; raises ConfigError naming the field."""
    data = load_yaml_mapping(path)
    return validate_config(Campaign, data, source=str(path))
