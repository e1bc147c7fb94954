"""A campaign directory's own state: ``campaign.yaml``, ``state.json`` and the target phases.

The driver (``search.runner``) writes it, the reports read it; both import it from here, so the
reports never import the runner (and with it Ray).
"""

from __future__ import annotations

import json
from pathlib import Path

from search.campaign import load_campaign

STATE_FILE = "state.json"
CAMPAIGN_FILE = "campaign.yaml"
# a target's phase: running -> searched -> confirming -> done; one of these resumes where it was
ACTIVE_PHASES = ("running", "searched", "confirming")


class CampaignError(RuntimeError):
    """A campaign cannot start or continue; the message says why and what to do."""


def read_state(campaign_dir: Path) -> dict:
    path = campaign_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"targets": {}}


def write_state(campaign_dir: Path, state: dict) -> None:
    tmp = campaign_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(campaign_dir / STATE_FILE)


def locate_campaign(name_or_path: str, storage_path: str = "./ray_results") -> Path:
    """A campaign directory from its name (under storage_path), its directory, or its YAML file."""
    p = Path(name_or_path).expanduser()
    candidates = [p, Path(storage_path).expanduser() / name_or_path]
    if p.suffix in (".yaml", ".yml") and p.is_file():
        try:
            camp = load_campaign(p)
            candidates.insert(0, camp.campaign_dir())
        except Exception:  # noqa: BLE001 - fall through to the other candidates
            pass
    for c in candidates:
        if (c / CAMPAIGN_FILE).is_file():
            return c.resolve()
    raise CampaignError(f"no campaign found for {name_or_path!r} (looked in: {', '.join(str(c) for c in candidates)})")
