"""The compact progress line: fits the width it is given and never cuts a word or number."""

from search.progress import progress_line


def test_full_line_when_it_fits():
    line = progress_line("demo_net/w3a3", 3, 16, {"RUNNING": 2, "COMPLETE": 2, "PRUNED": 1}, (0.8123, "f9ba8107", "dampen"),
                         75, width=200)
    assert line.startswith("demo_net/w3a3 [") and "3/16" in line
    assert "best 0.8123 (dampen, f9ba8107)" in line and "2 running" in line and "1 pruned" in line
    assert "failed" not in line  # zero counts are left out
    assert line.endswith("1m15s")


def test_narrow_widths_drop_whole_parts():
    full = progress_line("efficientnet_lite0/w3a3", 5, 16, {"COMPLETE": 4, "FAIL": 1, "RUNNING": 1},
                         (0.7012, "ab12cd34", "freeze"), 3725, width=1000)
    parts = set(full.replace(" · ", "|").replace(" [", "|").split("|"))
    for width in range(20, 130, 7):
        line = progress_line("efficientnet_lite0/w3a3", 5, 16, {"COMPLETE": 4, "FAIL": 1, "RUNNING": 1},
                             (0.7012, "ab12cd34", "freeze"), 3725, width=width)
        assert len(line) <= width or line == "efficientnet_lite0/w3a3"
        assert line.startswith("efficientnet_lite0/w3a3")  # the name is never cut
        for piece in line.replace(" · ", "|").replace(" [", "|").split("|")[1:]:
            assert piece in parts or piece.startswith("#") or piece.endswith("]"), (width, piece)
    assert "1h02m" in full


def test_piped_log_shows_trials_running_at_once(capsys):
    """Two trials on two CPUs: the piped log says "2 running" when both run (a line printed only at
    each trial's end showed "1 running", the finished one's successor not yet started)."""
    from types import SimpleNamespace

    from search.progress import TargetProgress

    progress = TargetProgress("demo_net/w3a3", num_samples=3, max_epochs=2)
    a, b, c = (SimpleNamespace(trial_id=t, config={"method": m}, last_result={"val_top1": v, "epoch": 2,
                                                                              "training_iteration": 2})
               for t, m, v in (("aaaa0001", "lsq", 0.81), ("bbbb0002", "dampen", 0.84), ("cccc0003", "freeze", 0.8)))
    progress.on_trial_start(0, [], a)
    progress.on_trial_start(0, [], b)
    progress.on_trial_complete(0, [], a)
    progress.on_trial_start(0, [], c)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "demo_net/w3a3: trial aaaa0001 (lsq) started"
    assert lines[2] == "demo_net/w3a3: trial bbbb0002 (dampen) started" and "2 running" in lines[3]
    assert "trial aaaa0001 (lsq) complete, val_top1 0.8100" in lines[4] and "1 running · 1 complete" in lines[5]
    assert "trial cccc0003 (freeze) started" in lines[6] and "2 running · 1 complete" in lines[7]
