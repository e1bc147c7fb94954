"""The parent run's description: what a person reads first in the MLflow UI."""

from __future__ import annotations

from search.campaign import Campaign
from search.tracking import parent_description


def test_description_links_the_best_trial_in_the_model_training_view():
    campaign = Campaign(name="demo", targets=[{"arch": "demo_net", "bits": "w3a3"}])
    best = {"trial_id": "5d5ab6fe", "run_id": "abc123", "method": "freeze", "val_top1": 0.8908,
            "counts": {"COMPLETE": 3, "PRUNED": 3}}
    text = parent_description(campaign, campaign.targets[0], "demo_net", ["freeze_threshold_end"], "7", best)
    assert ("[5d5ab6fe](#/experiments/7/runs/abc123?workflowType=machine_learning) (freeze), val_top1 0.8908"
            in text)
    assert "3 complete, 3 pruned" in text
    assert "oscqat report export demo --target demo_net/w3a3 --out best.yaml" in text
