"""Trial checkpoints follow `checkpoint_interval_s` (default 10 s): short trials checkpoint
only at their last epoch, so Tune does not snapshot the experiment after every other epoch."""

from __future__ import annotations

import json


def test_short_trials_checkpoint_only_at_their_last_epoch(report_campaign):
    trial_dirs = sorted(report_campaign.campaign_dir.glob("*/train_trial_*"))
    assert trial_dirs, f"no trial directories under {report_campaign.campaign_dir}"
    finished = 0
    for trial_dir in trial_dirs:
        epochs = [json.loads(line)["epoch"] for line in (trial_dir / "result.json").read_text().splitlines()]
        checkpoints = sorted(p.name for p in trial_dir.glob("checkpoint_*"))
        if max(epochs) == 2:  # trained the whole budget: one checkpoint, at the end
            finished += 1
            assert len(checkpoints) == 1, (trial_dir.name, checkpoints)
        else:  # stopped by ASHA after epoch 1 (well under 10 s): none
            assert checkpoints == [], (trial_dir.name, checkpoints)
    assert finished >= 1
