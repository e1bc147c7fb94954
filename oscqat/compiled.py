"""The compiled training forward (``TrainConfig.compile``): one torch.compile'd function per Trainer.

The function is the step's forward, task loss and dampening term; autograd's backward of it is
compiled with it (AOTAutograd), so the quantizers' elementwise passes (divide, clamp, round,
compare, multiply and their backward) and the fused dampening sums become a few Inductor kernels.
The optimizers, the scale-collapse check and the oscillation tracker stay eager: they are sparse
bookkeeping, and the tracker's freezing changes the frozen set every few steps. The graph keeps
no ``x / s`` for the tracker (that output would cost a pass over every weight); the Trainer calls
``OscillationTracker.observe`` before the optimizer step instead, which reads the live weights. Inside the graph
the frozen weights are the layers' dense ``frozen_mask``/``frozen_int`` buffers (see
``QuantMixin._quantize_weight``), edited in place by freezing, so the graph is compiled once
whatever freezes later.

A call runs eagerly (same numbers, no compilation) while a quantizer has not yet seen a forward
(its first forward calibrates it; after a checkpoint load it looks up its grid bounds), and for a
batch whose shape differs from the first compiled one (an epoch's smaller last batch): one graph
per run, not one per batch size. Evaluation never goes through this function.
"""

from __future__ import annotations

import time
import types
import warnings
from typing import Callable

import torch
from torch import nn

from oscqat.quantizer import LSQQuantizer


def own_code(fn: Callable) -> Callable:
    """``fn`` (a function or bound method) with a code object of its own.

    Dynamo keeps compiled graphs per code object, with a guard on the backend, and stops
    compiling a code object after ``recompile_limit`` (8) entries: Trainers that all compiled
    ``Trainer._loss_terms`` would silently fall back to eager from the ninth on in one process
    (a Ray worker reused across trials). A private copy keeps each one's graph to itself, and
    lets it go with the Trainer.
    """
    func = getattr(fn, "__func__", fn)
    copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = func.__kwdefaults__, func.__qualname__
    return types.MethodType(copy, fn.__self__) if hasattr(fn, "__self__") else copy


class CompiledForward:
    """``fn(x, y, lam)`` compiled with ``backend`` for one model; counts its compilations.

    ``graphs_compiled`` counts the graphs the backend built (the first compile and every
    recompile); ``compile_time_s`` is the wall time of the calls that compiled one, plus the
    backward the caller reports through ``add_backward_time`` for those steps. One call that
    builds several graphs means graph breaks: each is a separate graph with eager Python between
    them, slower to compile and run, so it is warned about once (``graph_breaks`` counts them).
    """

    def __init__(self, model: nn.Module, fn: Callable, backend: str = "inductor"):
        self.compile_time_s = 0.0
        self.compiled_calls = 0
        self.eager_calls = 0
        self.last_call_compiled = False  # the latest call built a graph (its backward may compile too)
        self.graph_breaks = 0
        self._shape: tuple | None = None
        self._quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
        self._eager = fn
        inner = torch._dynamo.lookup_backend(backend)
        # dynamo's cache (C-level, invisible to the garbage collector) keeps the backend: it must
        # not hold this object, or the model and Trainer would never be freed
        self._count = count = [0]

        def counting_backend(gm, example_inputs):
            count[0] += 1
            return inner(gm, example_inputs)

        self._compiled = torch.compile(own_code(fn), backend=counting_backend, dynamic=False)

    @property
    def graphs_compiled(self) -> int:
        return self._count[0]

    def _ready(self) -> bool:
        return all(q._ready for q in self._quantizers)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor):
        shape = (tuple(x.shape), tuple(y.shape))
        if not self._ready() or (self._shape is not None and shape != self._shape):
            self.eager_calls += 1
            self.last_call_compiled = False
            return self._eager(x, y, lam)
        self._shape = shape
        before = self.graphs_compiled
        start = time.perf_counter()
        out = self._compiled(x, y, lam)
        self.compiled_calls += 1
        self.last_call_compiled = self.graphs_compiled != before
        if self.last_call_compiled:
            self.compile_time_s += time.perf_counter() - start
            if self.graphs_compiled - before > 1:
                if not self.graph_breaks:
                    warnings.warn(
                        f"torch.compile (torch {torch.__version__}) split the training step into "
                        f"{self.graphs_compiled - before} graphs: graph breaks make compiling and each step slower; "
                        "run with TORCH_LOGS=graph_breaks to see where", RuntimeWarning, stacklevel=2)
                self.graph_breaks += self.graphs_compiled - before - 1
        return out

    def add_backward_time(self, seconds: float) -> None:
        """The backward of a step whose forward compiled: AOTAutograd may compile it lazily."""
        if self.last_call_compiled:
            self.compile_time_s += seconds
