"""Checks a campaign must pass before anything is written (stores, campaign directory, Ray state).

Each of these used to fail late, after the campaign name was burnt: inside a Ray task (a seed
that overflows), as a torch traceback (a truncated or empty checkpoint), as every trial
erroring with exit 0 (a checkpoint of another architecture), as ``NotADirectoryError``
(``storage_path`` naming a file), or as a hang (resources no node has). Each raises
``ConfigError`` naming the field (exit 2).
"""

from __future__ import annotations

import os
from pathlib import Path

from oscqat.config import ConfigError
from search.campaign import Campaign


def check_storage_path(campaign: Campaign) -> None:
    if campaign.remote_storage:
        return
    path = Path(campaign.storage_path).expanduser().resolve()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"storage_path: {campaign.storage_path!r} is not a directory "
                                  f"({p} is a file)")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(f"storage_path: {p} is not writable")
            return


def check_pretrained(campaign: Campaign) -> None:
    """Every target's ``pretrained`` file loads (weights only) and fits the target's architecture."""
    from oscqat.models.registry import create_model, safe_torch_load

    for i, target in enumerate(campaign.targets):
        if not target.pretrained:
            continue
        field = f"targets[{i}].pretrained"
        path = Path(target.pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"{field}: {path} is not a file")
        if path.stat().st_size == 0:
            raise ConfigError(f"{field}: {path} is empty")
        try:
            state = safe_torch_load(path)
        except ValueError as exc:
            raise ConfigError(f"{field}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...
            raise ConfigError(f"{field}: {path} is not a readable torch checkpoint (truncated or corrupt?): "
                              f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not state:
            raise ConfigError(f"{field}: {path} holds no state dict")
        names = {str(k).removeprefix("module.") for k in state}
        expected = set(create_model(target.arch, num_classes=10).state_dict())
        missing, unexpected = sorted(expected - names), sorted(names - expected)
        if missing or unexpected:
            raise ConfigError(f"{field}: {path} is not a {target.arch} checkpoint (missing {len(missing)} "
                              f"keys, e.g. {missing[:2]}; unexpected {len(unexpected)}, e.g. {unexpected[:2]})")


def check_resources(campaign: Campaign, available: dict[str, float]) -> None:
    """One trial (and the FP pretraining task) must fit on the cluster as it is: Ray would wait
    forever ("No available node types can fulfill...") instead of failing."""
    wanted = {"CPU": campaign.resources.cpu, "GPU": campaign.resources.gpu}
    field = {"CPU": "resources.cpu", "GPU": "resources.gpu"}
    for key, amount in wanted.items():
        if amount and amount > available.get(key, 0.0):
            raise ConfigError(f"{field[key]}: each trial asks for {amount:g} {key}, but the Ray cluster has "
                              f"{available.get(key, 0.0):g} in all (resources: "
                              f"{', '.join(f'{k} {v:g}' for k, v in sorted(available.items()) if k in ('CPU', 'GPU'))})")


def check_no_credentials(campaign: Campaign) -> None:
    """Values that reach every trial's config, checkpoint and artifacts may not carry credentials:
    they belong in the environment (AWS_*, ~/.aws, the store's own credential files)."""
    from search.uris import has_credentials

    for key, value in campaign.base.items():
        if isinstance(value, str) and has_credentials(value):
            raise ConfigError(f"base.{key}: holds credentials; every trial's config, checkpoint and artifacts "
                              f"would keep them. Remove them from the URI and give them through the environment "
                              f"(e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) or the store's credential file")


def local_resources() -> dict[str, float]:
    """What a local ``ray.init()`` will offer: the CPUs this process may use, the visible GPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA runtime: no GPUs
        gpus = 0
    return {"CPU": float(cpus), "GPU": float(gpus)}


def check_before_writing(campaign: Campaign) -> None:
    """The checks that need no Ray and no store."""
    check_no_credentials(campaign)
    check_storage_path(campaign)
    check_pretrained(campaign)
