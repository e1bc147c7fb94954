"""``oscqat export onnx RUN``: integer QDQ ONNX of a trained run, checked against the PyTorch model.

Mounted by the root CLI, which may pass ``on_exported`` (the reports layer logs the files and the
parity result to the run's MLflow final run); the library itself stays free of MLflow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from oscqat.cli import err_console, fail

ExportHook = Callable[[Path, list[Path], Optional[dict]], str]  # (run dir, files, parity) -> a line for the user

PARITY_ROWS = (("top1_agreement", "top-1 agreement"), ("torch_test_top1", "PyTorch top-1"),
               ("onnx_test_top1", "ONNX Runtime top-1"), ("max_abs_logit_diff", "max |logit diff|"),
               ("mean_abs_logit_diff", "mean |logit diff|"), ("weights_bit_exact", "weights bit-exact"))


def parity_table(parity: dict) -> Table:
    table = Table(title=f"parity: ONNX Runtime vs fake-quantized PyTorch ({parity['split']} split, "
                        f"{parity['samples']} images)")
    table.add_column("check")
    table.add_column("value", justify="right")
    for key, label in PARITY_ROWS:
        value = parity[key]
        table.add_row(label, str(value) if isinstance(value, bool) else f"{value:.6g}")
    verdict = "[green]PASS[/]" if parity["passed"] else "[bold red]FAIL[/]"
    table.add_row("result", f"{verdict} (agreement >= {parity['threshold']} and weights bit-exact)")
    return table


def make_export_app(on_exported: ExportHook | None = None) -> typer.Typer:
    app = typer.Typer(no_args_is_help=True, add_completion=False, help="Export a trained run for deployment.")

    @app.command("onnx")
    def onnx_command(
        run: Path = typer.Argument(..., help="a training output directory (oscqat train --out), or its model.pt / checkpoint.pt"),
        out: Optional[Path] = typer.Option(None, "--out", help="ONNX file to write (default: RUN/model.onnx); parity.json goes beside it"),
        parity: bool = typer.Option(True, "--parity/--no-parity", help="check ONNX Runtime against the PyTorch model (default on)"),
        threshold: float = typer.Option(0.995, "--threshold", min=0.0, max=1.0, help="minimum top-1 agreement for the parity check"),
        int8_only: bool = typer.Option(False, "--int8-only", help="store <= 4-bit weights in int8 instead of int4 containers"),
        max_batches: Optional[int] = typer.Option(None, "--max-batches", min=1, help="limit the parity check to this many batches"),
        as_json: bool = typer.Option(False, "--json", help="print the result as JSON on stdout"),
    ) -> None:
        """Write an integer QDQ ONNX model of RUN and check it against the fake-quantized model (exit 1 when the check fails)."""
        from oscqat.export import ExportError, check_parity, evaluation_split, export_onnx, load_trained_model
        from oscqat.export.parity import PARITY_FILE

        try:
            trained = load_trained_model(run)
        except (FileNotFoundError, ValueError) as exc:
            raise fail(str(exc))
        if not trained.config.quantized:
            raise fail(f"{trained.source}: an FP model ({trained.config.bits}); export onnx writes integer models only")
        run_dir = trained.source.parent
        target = out or run_dir / "model.onnx"
        data = None
        size = trained.image_size
        if size is None or parity:
            from oscqat.data import build_data

            try:
                data = build_data(trained.config)
            except (FileNotFoundError, ValueError, RuntimeError) as exc:
                raise fail(f"cannot load the data of {trained.source} ({exc}); use --no-parity")
            size = size or data.image_size
        meta = {"oscqat.arch": trained.config.arch, "oscqat.bits": trained.config.bits,
                "oscqat.train_config": trained.config.model_dump_json()}
        try:
            info = export_onnx(trained.model, target, (trained.in_chans, size, size), int4=not int8_only, metadata=meta)
        except ExportError as exc:
            raise fail(f"{trained.source}: cannot export to ONNX: {exc}")
        files, result = [info.path], None
        if parity:
            split, loader = evaluation_split(data)
            result = check_parity(trained.model, info.path, loader, split, threshold, max_batches)
            parity_path = info.path.parent / PARITY_FILE
            parity_path.write_text(json.dumps(result, indent=2))
            files.append(parity_path)
        line = on_exported(run_dir, files, result) if on_exported is not None else ""
        if as_json:
            sys.stdout.write(json.dumps({"onnx": str(info.path), "parity": result,
                                         "weights": info.weights}) + "\n")
        else:
            console = Console()
            if result is not None:
                console.print(parity_table(result))
            console.print(f"wrote {info.path} (opset {info.opset}; {len(info.weights)} integer layers)", highlight=False)
            if line:
                console.print(line, highlight=False)
        if result is not None and not result["passed"]:
            why = (f"weights differ in {', '.join(result['weights_differing'][:5])}" if not result["weights_bit_exact"]
                   else f"top-1 agreement {result['top1_agreement']:.4f} < {threshold}")
            err_console.print(f"[bold red]parity check failed:[/] {why}", highlight=False)
            raise typer.Exit(1)

    return app


app = make_export_app()
