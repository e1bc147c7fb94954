"""``oscqat --version`` and help text without typer's ``<bool>`` / ``{config}`` placeholders."""

import subprocess
import sys



def _oscqat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import oscqat_cli; oscqat_cli.main()", *args], capture_output=True,
                          text=True, timeout=60, env={**__import__("os").environ, "COLUMNS": "120"})


def test_version():
    out = _oscqat("--version")
    assert out.returncode == 0 and out.stdout.startswith("oscqat ")


def test_help_has_no_type_placeholders():
    for args in (["--help"], ["train", "--help"], ["report", "export", "--help"], ["search", "run", "--help"],
                 ["report", "trials", "--help"], ["ui", "--help"]):
        res = _oscqat(*args)
        assert res.returncode == 0, res.stderr
        assert "<bool>" not in res.stdout and "{" not in res.stdout.split("Usage:", 1)[1].split("\n", 1)[0], args
    assert "train [OPTIONS] CONFIG" in _oscqat("train", "--help").stdout
