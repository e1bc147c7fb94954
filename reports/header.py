"""The ``# oscqat-...`` comment header of an exported config (standard library only).

Kept import-light on purpose: ``oscqat train`` checks every config for it, and a plain config
must not pay for importing MLflow, Optuna and Ray.
"""

from __future__ import annotations

from pathlib import Path

HEADER_PREFIX = "# oscqat-"
SOURCE_KEY = "source"


def read_header(path: str | Path) -> dict[str, str]:
    """``{key: value}`` of the leading ``# oscqat-key: value`` comment lines (empty if none)."""
    out: dict[str, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    for line in lines:
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        if line.startswith(HEADER_PREFIX) and ":" in line:
            key, _, value = line[len(HEADER_PREFIX):].partition(":")
            out[key.strip()] = value.strip()
    return out


def parse_source(value: str) -> dict[str, str]:
    """``campaign=t1 target=a/w3a3 trial=x rank=1`` -> a dict."""
    return dict(part.split("=", 1) for part in value.split() if "=" in part)


def is_exported(config: str | Path) -> bool:
    """Was this config written by ``oscqat report export`` (so its training belongs to a campaign)?"""
    return SOURCE_KEY in read_header(config)
