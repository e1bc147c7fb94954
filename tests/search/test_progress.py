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
