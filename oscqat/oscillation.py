"""Oscillation tracking and iterative weight freezing (METHOD.md sections 2 and 4).

The tracker reads the integer weights that each layer used in its latest forward pass
(``last_weight_int``), so it adds no extra quantization pass. Call ``step`` once per training
step, after ``optimizer.step()``; never during evaluation (that would decay the frequencies).

Scale-driven flips: an integer change between two forwards comes from the weight moving, the
scale moving, or both. For each integer that changed, the tracker re-quantizes this forward's
weight under the previous forward's scale, ``round(clip(v_t * s_t / s_{t-1}))`` with
``v_t = w_t / s_t`` kept by the quantizer; if that gives back the old integer, the weight alone
would not have flipped it: the flip is scale-driven. Only the changed integers are touched
(about 0.1% per step), with one gather per layer and the rest batched over all layers, not a
pass over the weights.
``pop_flip_stats`` returns the counts since the last call (the trainer's ``scale_flip_frac``).

A compiled step (``TrainConfig.compile``) calls ``observe`` between its backward and the
optimizer step: the update half of ``step``, with the attribution read from the live weights
and scales (still this forward's), because a graph that kept ``v_t`` for the tracker would write
it out for every weight.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from oscqat import native
from oscqat.layers import QuantMixin, quant_layers
from oscqat.quantizer import SCALE_EPS

WEIGHT_ALIGN = 16  # elements: each layer's slice of the flat weights starts on a 64-byte boundary (float32)


class _LayerState:
    """One layer's slice of the tracker's flat state, as views shaped like the weight."""

    __slots__ = ("_tracker", "_slice", "_shape", "_layer", "_wstart")

    def __init__(self, tracker: "OscillationTracker", sl: slice, shape: torch.Size, layer: QuantMixin,
                 wstart: int):
        self._tracker, self._slice, self._shape, self._layer = tracker, sl, shape, layer
        self._wstart = wstart  # where the layer's weights start in the tracker's flat weights

    def _view(self, flat: torch.Tensor | None) -> torch.Tensor | None:
        return None if flat is None else flat[self._slice].view(self._shape)

    @property
    def freq(self) -> torch.Tensor:
        """Oscillation frequency EMA (a writable view, valid until the next ``step``: write through
        a fresh one, since reading it is what makes the next freeze check look at every weight)."""
        t = self._tracker
        t._normalise()
        t._cleared = float("inf")  # the caller may write to it: check every weight next time
        return self._view(t._freq)

    @property
    def last_dir(self) -> torch.Tensor:
        return self._view(self._tracker._last_dir)

    @property
    def prev_int(self) -> torch.Tensor | None:
        """Integers of the latest update (a view into a buffer reused two steps later: clone to keep)."""
        return self._view(self._tracker._prev)

    @property
    def int_ema(self) -> torch.Tensor | None:
        """EMA of the integer weight (computed: previous integer plus its deviation)."""
        t = self._tracker
        if t._prev is None:
            return None
        t._normalise()
        return self._view(t._ema_dev.add(t._prev))

    @property
    def frozen_latent(self) -> torch.Tensor | None:
        """Latent values the frozen weights are pinned to, dense like the weight (a copy: the
        tracker holds them sparsely, see ``OscillationTracker._pin``; weights frozen by hand since
        its last step show their current value, the one they will be pinned to); None when none
        is frozen."""
        layer, t = self._layer, self._tracker
        if not layer._any_frozen:
            return None
        dense = layer.weight.detach().clone()
        n, a, numel = t._n_pins, self._wstart, dense.numel()
        if n:
            pos, latent = t._pin_pos[:n], t._pin_latent[:n]
            mine = (pos >= a) & (pos < a + numel)
            dense.view(-1).scatter_(0, pos[mine] - a, latent[mine])
        return dense


STATE_KEYS = ("prev_int", "last_dir", "freq", "int_ema", "frozen_latent")


def layer_kind(layer: QuantMixin) -> str:
    """'depthwise', 'pointwise' (1x1 conv) or 'other' (full conv, linear)."""
    if layer.is_depthwise:
        return "depthwise"
    if layer.is_pointwise:
        return "pointwise"
    return "other"


class OscillationTracker:
    """Per-weight oscillation frequency EMA, integer EMA and freezing for low-bit layers.

    The state of all tracked layers lives in flat buffers (``states[name]`` gives per-layer
    views). Both EMAs are kept in a scaled form that only changes where an integer changed:
    ``f = _freq * _decay`` and ``x_ema = prev + _ema_dev * _decay``, with the common factor
    ``_decay = (1-m)^k`` a Python float. A step then costs one subtraction over all weights and
    work proportional to the few integers that moved, not a dozen passes over every weight.
    A frozen weight's frequency is set to 0 when it freezes (its integer no longer changes, so
    it cannot oscillate); this keeps the freeze check a single ``max`` over the frequencies.

    Args:
        module: model holding quantized layers.
        momentum: EMA momentum ``m`` for the frequency and the integer EMA.
        max_bits: track layers whose weight bits are ``<= max_bits``.
        report_threshold: a weight counts as oscillating in ``summary`` when ``f`` exceeds it.
            Default ``2 * momentum``: more than about two oscillations within the EMA's horizon
            of ``1/m`` steps, so the fraction means the same whatever momentum a trial uses.
    """

    def __init__(self, module: nn.Module, momentum: float = 1e-3, max_bits: int = 4,
                 report_threshold: float | None = None):
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.max_bits = max_bits
        self.report_threshold = 2.0 * momentum if report_threshold is None else report_threshold
        self.layers: dict[str, QuantMixin] = {
            name: layer for name, layer in quant_layers(module) if layer.weight_bits <= max_bits
        }
        self.states: dict[str, _LayerState] = {}
        offset = woffset = 0
        self._wstarts: list[int] = []  # each layer's start in the flat weights (_link_weights)
        for name, layer in self.layers.items():
            numel = layer.weight.numel()
            self.states[name] = _LayerState(self, slice(offset, offset + numel), layer.weight.shape, layer, woffset)
            self._wstarts.append(woffset)
            offset += numel
            woffset += -(-numel // WEIGHT_ALIGN) * WEIGHT_ALIGN
        self.numel = offset
        self._wnumel = woffset
        self._starts = [st._slice.start for st in self.states.values()] + [offset]
        self._layer_list = list(self.layers.values())
        self._names = list(self.layers)
        # Per-layer constants for batched lookups over all layers: where each layer's scales
        # sit in the flat scale vector, how many weights share one scale entry, and the grid.
        quantizers = [layer.weight_quantizer for layer in self._layer_list]
        # the hot loops read these plain dicts, not Module.__getattr__ (51 layers, twice a step)
        self._quant_dicts = [q.__dict__ for q in quantizers]
        self._quant_params = [q._parameters for q in quantizers]
        self._weight_params = [layer._parameters for layer in self._layer_list]
        sizes = [q.scale.numel() for q in quantizers]
        self._scale_starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self._scale_shapes = [tuple(q._broadcast_scale(layer.weight).shape)
                              for q, layer in zip(quantizers, self._layer_list)]
        self._per_scale = [layer.weight.numel() // k for layer, k in zip(self._layer_list, sizes)]
        self._consts: dict | None = None  # the constants above as tensors on the weights' device
        self._bounds_cache = None  # set on the first freeze (signedness is fixed by then)
        device = next(iter(self.layers.values())).weight.device if self.layers else torch.device("cpu")
        self._freq = torch.zeros(offset, device=device)  # frequency EMA / _decay
        self._last_dir = torch.zeros(offset, device=device)  # sign of the last integer change
        # Integers are kept in the smallest integer type that holds every tracked grid, in
        # buffers padded to whole blocks of 8 words of 8 bytes: finding the few that changed is
        # then one comparison of int64 words (8 weights each at int8) and searches inside the
        # hit blocks and words (see _moved).
        bits = max((layer.weight_bits for layer in self._layer_list), default=8)
        self._int_dtype = torch.int8 if bits <= 7 else torch.int16
        per_word = 8 // torch.tensor([], dtype=self._int_dtype).element_size()
        self._padded = -(-offset // (8 * per_word)) * 8 * per_word
        self._per_word = per_word
        self._prev: torch.Tensor | None = None  # integers of the previous step (``_int_dtype``)
        self._cur: torch.Tensor | None = None  # this step's integers; the layers' sinks view it
        self._s_cur: torch.Tensor | None = None  # this step's clamped scales, the same way
        self._sinks_fed = False  # the latest gather found every layer's integers in its sink
        self._make_sinks(device)
        self._ema_dev: torch.Tensor | None = None  # (integer EMA - prev) / _decay
        self._decay = 1.0
        # Every non-frozen scaled frequency is <= _cleared (the last scaled threshold every weight
        # was checked against), so while the scaled threshold does not drop below it, only the
        # weights that just flipped can cross it: freezing then costs no pass over all weights.
        self._cleared = 0.0
        # the last update's moved indices, and which of them oscillated (freeze candidates)
        self._flipped: tuple[torch.Tensor, torch.Tensor] | None = None
        self._dense_moves = True  # last update moved many integers: find them with one nonzero
        # The sparse update in native CPU loops (oscqat.native, bit-identical) where they build;
        # False forces the torch ops (the reference).
        self.use_native = True
        self._moved_buf = torch.empty(max(self.numel // 64, 1024), dtype=torch.int64)  # native: moved indices
        self._osc_buf = torch.empty(self._moved_buf.numel(), dtype=torch.uint8)  # and which oscillated
        self._cand_buf = torch.empty(0, dtype=torch.int64)  # native: freeze candidates
        self._n_same, self._n_attributed = ctypes.c_int64(), ctypes.c_int64()
        self._attributable = None  # (per-layer flags, as a uint8 tensor) for the native attribution
        self.steps = 0
        for layer in self.layers.values():  # keep x / s and s of each training forward (references)
            layer.weight_quantizer.record_forward = True
        # every layer's (clamped) scale in the previous forward, flat; which layers have one
        self._s_prev: torch.Tensor | None = None
        self._has_s_prev = [False] * len(self.layers)
        self._flips_scale: torch.Tensor | None = None  # scale-driven changes since pop_flip_stats
        self._flips_total = 0  # attributed integer changes since pop_flip_stats
        self._observed = False  # observe() did this step's update; step() only freezes and pins
        self._mask_views: list = []  # the layers' frozen_mask/frozen_int: views into the flat ones
        self._link_frozen()
        # Pinning: every frozen weight's position in the flat weights and the latent value it keeps
        # (the first _n_pins entries of tensors with spare room, grown by doubling), see _pin
        self._flat_w: torch.Tensor | None = None
        self._w_ptrs: list[int] = []
        self._pin_pos: torch.Tensor | None = None
        self._pin_latent: torch.Tensor | None = None
        self._n_pins = 0
        self._link_weights()
        # the layers' count of frozen-set edits made through them (QuantMixin._frozen_version)
        self._seen_versions = [layer._frozen_version for layer in self._layer_list]
        self._rebuild_pins()  # weights frozen before the tracker came (a loaded model) keep their values

    def _link_frozen(self) -> None:
        """Make every layer's ``frozen_mask``/``frozen_int`` a view into one flat tensor each.

        Freezing then marks the new weights of all layers in two ops instead of two per touched
        layer. Called again when a layer's buffer was replaced (``model.to``, an assignment):
        the flat tensors take the layer's current values, so nothing is lost."""
        if not self.layers:
            return
        device = self._layer_list[0].frozen_mask.device
        mask = torch.zeros(self.numel, dtype=torch.bool, device=device)
        ints = torch.zeros(self.numel, dtype=torch.int8, device=device)
        views = []
        for layer, st in zip(self._layer_list, self.states.values()):
            buffers = layer._buffers
            m, i = mask[st._slice].view(st._shape), ints[st._slice].view(st._shape)
            m.copy_(buffers["frozen_mask"])
            i.copy_(buffers["frozen_int"])
            buffers["frozen_mask"], buffers["frozen_int"] = m, i
            views.append((m, i))
        self._frozen_mask, self._frozen_int, self._mask_views = mask, ints, views

    def _frozen_linked(self) -> bool:
        return all(layer._buffers["frozen_mask"] is m and layer._buffers["frozen_int"] is i
                   for layer, (m, i) in zip(self._layer_list, self._mask_views))

    def _link_weights(self) -> None:
        """Make every tracked layer's weight a view into one flat tensor, each layer's slice
        starting on a 64-byte boundary (compiled kernels assume aligned inputs and would copy a
        misaligned one at every call).

        Pinning the frozen weights is then one scatter over all layers, and the live scale-flip
        attribution one gather. The parameters stay the same objects (optimizers keep them);
        their data moves into the flat tensor, contiguous. Called again when a weight was replaced
        (``model.to``, an assignment): the flat tensor takes the current values."""
        if not self.layers:
            return
        params = [p["weight"] for p in self._weight_params]
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            raise ValueError("the tracked layers' weights must share one dtype and device, got "
                             f"{sorted({(str(p.dtype), str(p.device)) for p in params})}")
        flat = torch.zeros(self._wnumel, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for p, start in zip(params, self._wstarts):
                view = flat[start:start + p.numel()].view(p.shape)
                view.copy_(p)
                p.data = view
        self._flat_w = flat
        self._w_ptrs = [p.data_ptr() for p in params]
        if self._pin_pos is not None and self._pin_pos.device != flat.device:
            self._pin_pos, self._pin_latent = self._pin_pos.to(flat.device), self._pin_latent.to(flat.device)
        if self._pin_latent is not None and self._pin_latent.dtype != flat.dtype:
            self._pin_latent = self._pin_latent.to(flat.dtype)

    def _weights_linked(self) -> bool:
        return all(p["weight"].data_ptr() == ptr for p, ptr in zip(self._weight_params, self._w_ptrs))

    def _sync_layers(self, relink: bool = True) -> None:
        """Relink replaced buffers and weights (``relink``); take in weights frozen by hand
        (``refresh_frozen``, ``freeze_weights``, a model load) since the last step: their
        frequency is zeroed, so they are never candidates again, and they are pinned from now on
        at their current values."""
        if not self.layers:
            return
        if relink and not self._frozen_linked():
            self._link_frozen()
        if relink and not self._weights_linked():
            self._link_weights()
        changed = False
        for i, layer in enumerate(self._layer_list):
            version = layer.__dict__["_frozen_version"]
            if version != self._seen_versions[i]:
                self._seen_versions[i] = version
                a, b = self._starts[i], self._starts[i + 1]
                self._freq[a:b].masked_fill_(self._frozen_mask[a:b], 0.0)
                changed = True
        if changed:
            self._pin()  # the weights frozen before keep their latent values
            self._rebuild_pins()

    def _pin(self) -> None:
        """Put every frozen weight's latent value back, undoing the drift of the optimizer step
        just taken (momentum, weight decay): one scatter over the flat weights."""
        n = self._n_pins
        if n:
            lib = self._native_lib(self._flat_w)
            if lib is not None:
                lib.oscqat_pin(self._flat_w.data_ptr(), self._pin_pos.data_ptr(), self._pin_latent.data_ptr(), n)
            else:
                self._flat_w.scatter_(0, self._pin_pos[:n], self._pin_latent[:n])

    def _add_pins(self, wpos: torch.Tensor) -> None:
        """Pin the weights at flat-weight positions ``wpos`` (not pinned yet) at their current values."""
        k, n = wpos.numel(), self._n_pins
        self._reserve_pins(k, wpos.device)
        self._pin_pos[n:n + k].copy_(wpos)
        torch.index_select(self._flat_w, 0, wpos, out=self._pin_latent[n:n + k])
        self._n_pins = n + k

    def _reserve_pins(self, k: int, device: torch.device) -> None:
        """Room for ``k`` more pins in the pin store (doubling, so appends stay amortised O(1))."""
        n = self._n_pins
        if self._pin_pos is None or self._pin_pos.numel() < n + k:
            cap = max(2 * (n + k), 1024)
            pos = torch.empty(cap, dtype=torch.int64, device=device)
            latent = torch.empty(cap, dtype=self._flat_w.dtype, device=device)
            if n:
                pos[:n].copy_(self._pin_pos[:n])
                latent[:n].copy_(self._pin_latent[:n])
            self._pin_pos, self._pin_latent = pos, latent

    def _rebuild_pins(self) -> None:
        """Pin every frozen weight at its current value (all layers, from the dense masks)."""
        self._n_pins = 0
        if not self.layers:
            return
        idx = torch.nonzero(self._frozen_mask).squeeze(1)
        if idx.numel():
            self._add_pins(self._weight_positions(idx))

    def _weight_positions(self, idx: torch.Tensor, lid: torch.Tensor | None = None) -> torch.Tensor:
        """Positions in the flat weights of the tracker indices ``idx`` (``lid``: their layers)."""
        c = self._constants(idx.device)
        if lid is None:
            lid = torch.searchsorted(c["starts"], idx, right=True).sub_(1)
        return idx + c["wshift"].index_select(0, lid)

    def _make_sinks(self, device: torch.device) -> None:
        """Fresh ``_cur`` (integers) and ``_s_cur`` (clamped scales) buffers on ``device``, and
        each layer's sinks: its slices of them, which a compiled forward writes in place."""
        self._cur = self._int_buffer(device)
        self._s_cur = torch.ones(self._scale_starts[-1], device=device)
        for i, (layer, st) in enumerate(zip(self._layer_list, self.states.values())):
            layer.__dict__["_int_sink"] = self._cur[st._slice].view(st._shape)
            scale = self._quant_params[i]["scale"]
            layer.__dict__["_scale_sink"] = self._s_cur[self._scale_starts[i]:self._scale_starts[i + 1]].view(scale.shape)

    def _gather_ints(self) -> tuple[torch.Tensor | None, list[str]]:
        """All layers' latest forward integers as one flat tensor (``_cur``), and the layers that
        had none (they get their previous integers).

        ``_cur`` is kept across steps: a fresh multi-megabyte tensor per step costs page faults
        that outweigh the copy. A compiled forward wrote its integers into it already (each
        layer's sink), so then nothing is copied; an eager one hands over float integers, cast
        on the copy into it.
        """
        parts, missing = [], []
        for name, layer in self.layers.items():
            x_int = layer.last_weight_int
            if x_int is None:
                missing.append(name)
                if self._prev is None:
                    x_int = layer.weight_int()
                else:
                    x_int = self._prev[self.states[name]._slice]
            parts.append(x_int)
        if len(missing) == len(self.layers):
            return None, missing
        device = parts[0].device
        if self._freq.device != device:  # the model moved after the tracker was built
            self._freq, self._last_dir = self._freq.to(device), self._last_dir.to(device)
            if self._prev is not None:  # onto a padded buffer again (see _int_buffer)
                self._prev, self._ema_dev = self._int_buffer(device).copy_(self._prev), self._ema_dev.to(device)
            if self._s_prev is not None:
                self._s_prev = self._s_prev.to(device)
        if self._cur.device != device:  # the next compiled forward writes into the new sinks
            self._make_sinks(device)
        fed = True  # every layer's integers (and scales) came from a compiled forward's sinks
        for part, layer, lo, hi in zip(parts, self._layer_list, self._starts, self._starts[1:]):
            if part is not layer._int_sink:
                self._cur[lo:hi].copy_(part.reshape(-1))
                fed = False
        self._sinks_fed = fed
        return self._cur, missing

    def _int_buffer(self, device: torch.device) -> torch.Tensor:
        """A flat ``_int_dtype`` buffer of ``numel`` integers on storage padded (with zeros) to
        whole 8-byte words, see ``_moved``."""
        return torch.zeros(self._padded, dtype=self._int_dtype, device=device)[:self.numel]

    @torch.no_grad()
    def observe(self) -> None:
        """The update half of ``step``, for a step whose forward kept no ``x / s`` (a compiled one).

        Call after the training forward (or its backward) and before the optimizer step, then
        ``step`` after it as usual (freezing and the latent pins need the stepped weights). The
        scale-flip attribution reads the layers' weights and scales, which still hold the values
        of that forward; the result equals ``step`` alone on a recorded forward.
        """
        self._flipped = None
        if self.layers and not self._frozen_linked():  # step() relies on both links checked here
            self._link_frozen()
        if self.layers and not self._weights_linked():  # the attribution reads the flat weights
            self._link_weights()
        x, missing = self._gather_ints() if self.layers else (None, [])
        if x is not None:
            self._update(x, missing, live=True)
        self._consume()
        if x is not None:  # this forward's scales are the next update's "previous" ones
            if self._sinks_fed:  # the graph wrote them (clamped) into _s_cur
                self._s_prev = self._s_cur.clone()
                self._has_s_prev = [True] * len(self.layers)
            else:
                self._s_prev = self._flat_scales([q["scale"] for q in self._quant_params], missing)
        self._observed = True

    @torch.no_grad()
    def step(self, freeze_threshold: float = 0.0) -> None:
        """Update every tracked layer from its latest forward; freeze where ``f > freeze_threshold``.

        ``freeze_threshold=0`` disables freezing. A layer without a forward since the last step
        is left as it is. Also pins the latent value of frozen weights, undoing any weight-decay
        or momentum drift from the optimizer step just taken. After ``observe`` only the
        freezing and pinning are left to do.
        """
        s_now = None
        observed, self._observed = self._observed, False
        if not observed:
            self._flipped = None
            x, missing = self._gather_ints() if self.layers else (None, [])
            if x is not None:
                last = [q["last_scale"] for q in self._quant_dicts]
                if any(t is not None for t in last):
                    s_now = self._flat_scales(last, [n for n, t in zip(self.layers, last) if t is None])
                self._update(x, missing, s_now=s_now)
        # after the update: a weight frozen by hand is never a candidate (observe() checked the
        # links of this step's weights already: only the optimizer step ran since, in place)
        self._sync_layers(relink=not observed)
        if freeze_threshold > 0.0 and self.layers:
            scaled = freeze_threshold / self._decay
            if scaled >= self._cleared:  # only weights that just flipped can have crossed it
                new = None
                if self._flipped is not None:
                    new = self._candidates(*self._flipped, scaled)
            elif float(self._freq.max()) > scaled:
                new = torch.nonzero(self._freq > scaled).squeeze(1)
            else:
                new = None
            if new is not None and new.numel():
                # frozen weights have frequency 0, so every candidate is a new one
                self._freeze(new, incremental=not observed)
            self._cleared = scaled
        else:
            self._cleared = float("inf")  # frequencies rise unchecked: check all at the next freeze
        self._pin()
        if not observed:  # observe() consumed them already
            self._consume()
        if s_now is not None:  # this forward's scales are the next update's "previous" ones
            self._s_prev = s_now
        self.steps += 1

    def _consume(self) -> None:
        """Drop the latest forward's records: a forward must run before the next update."""
        for layer, q in zip(self._layer_list, self._quant_dicts):
            layer.__dict__["last_weight_int"] = None
            q["last_v"] = q["last_scale"] = None

    def _flat_scales(self, scales: list, keep: list[str]) -> torch.Tensor:
        """All layers' scales as one flat, clamped vector (a copy); the layers named in ``keep``
        (or whose entry is None) keep their previous entries. Marks which layers have one."""
        if not keep:  # (under no_grad: no detach needed)
            flat = torch.cat([t.reshape(-1) for t in scales]).clamp_min_(SCALE_EPS)
            self._has_s_prev = [True] * len(scales)
            return flat
        keep = set(keep)
        old = self._s_prev
        parts = []
        for i, (name, t) in enumerate(zip(self.layers, scales)):
            a, b = self._scale_starts[i], self._scale_starts[i + 1]
            if name in keep or t is None:
                parts.append(old[a:b] if old is not None and self._has_s_prev[i]
                             else torch.ones(b - a, device=self._freq.device))
            else:
                parts.append(t.detach().reshape(-1).clamp_min(SCALE_EPS))
                self._has_s_prev[i] = True
        return torch.cat(parts)

    def _attribute(self, moved: torch.Tensor, missing: list[str], live: bool = False,
                   s_now: torch.Tensor | None = None) -> None:
        """Count how many of the integers at ``moved`` (this update's changes) the scale caused.

        A layer is attributed only when its quantizer recorded this forward and the previous
        one (so hand-fed integers and the first update after a load are skipped). ``live``
        (``observe``): this forward's ``w_t / s_{t-1}`` from the weights themselves; otherwise
        ``v_t * s_t / s_{t-1}`` from the recorded ``v_t`` and this forward's scales ``s_now``.
        One gather per layer; the rest is batched over all layers."""
        if self._s_prev is None or (not live and s_now is None):
            return
        c = self._constants(moved.device)
        cuts = torch.searchsorted(moved, c["starts"]).tolist()
        take, segments = [], []
        for i, layer in enumerate(self._layer_list):
            a, b = cuts[i], cuts[i + 1]
            if a == b or not self._has_s_prev[i]:
                continue
            src = self._weight_params[i]["weight"] if live else self._quant_dicts[i]["last_v"]
            if src is None or (missing and self._names[i] in missing):
                continue
            take.append((src, i))
            segments.append((a, b))
        if not take:
            return
        if sum(b - a for a, b in segments) == moved.numel():  # every moved index is attributed
            idx = moved
        else:
            idx = torch.cat([moved[a:b] for a, b in segments])
        lid = torch.searchsorted(c["starts"], idx, right=True).sub_(1)  # each index's layer
        local = idx - c["starts"].index_select(0, lid)
        if live:  # one gather from the flat weights
            grid = self._flat_w.index_select(0, idx + c["wshift"].index_select(0, lid))
        else:
            locals_ = local.split([b - a for a, b in segments])  # one call, not a slice per layer
            pieces = [src.reshape(-1).index_select(0, loc) for (src, _), loc in zip(take, locals_)]
            grid = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        entry = local.div_(c["per_scale"].index_select(0, lid), rounding_mode="floor").add_(
            c["scale_starts"].index_select(0, lid))
        s_prev = self._s_prev.index_select(0, entry)
        if live:  # w_t / s_{t-1}
            grid.div_(s_prev)
        else:  # v_t * (s_t / s_{t-1})
            grid.mul_(s_now.index_select(0, entry) / s_prev)
        shared = self._bounds()[0]
        if shared is not None:
            grid.clamp_(*shared)
        else:
            grid = torch.clamp(grid, c["lo"].index_select(0, lid), c["hi"].index_select(0, lid))
        same = (grid.round_() == self._prev.index_select(0, idx)).sum()
        self._flips_total += idx.numel()
        self._flips_scale = same if self._flips_scale is None else self._flips_scale + same

    def pop_flip_stats(self) -> tuple[int, int]:
        """``(scale-driven changes, attributed changes)`` since the last call; resets both."""
        scale = 0 if self._flips_scale is None else int(self._flips_scale)
        total = self._flips_total
        self._flips_scale, self._flips_total = None, 0
        return scale, total

    def _moved(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Sorted flat indices where ``x != prev`` (two ``_int_buffer`` tensors).

        Usually about 0.1% of the integers move per step; a full ``nonzero`` then costs several
        times more than comparing the buffers as int64 words (their zero padding is equal) and
        searching only the words that differ. The word flags are searched the same way, as
        int64 blocks of 8 flags (a ``nonzero`` over all word flags alone costs twice the rest).
        The word search is used while the moves stay sparse.
        """
        if self._dense_moves or x.numel() < 1 << 16:
            moved = torch.nonzero(x != prev).squeeze(1)
        else:
            k = self._per_word
            words_x = x.as_strided((self._padded // k, k), (k, 1))
            words_prev = prev.as_strided((self._padded // k, k), (k, 1))
            flags = (words_x.view(torch.int64) != words_prev.view(torch.int64)).view(-1)
            blocks = torch.nonzero(flags.view(torch.int64)).squeeze(1)  # blocks of 8 words with a hit
            sub = torch.nonzero(flags.view(-1, 8).index_select(0, blocks))
            hit = blocks.index_select(0, sub[:, 0]).mul_(8).add_(sub[:, 1])
            local = torch.nonzero(words_x.index_select(0, hit) != words_prev.index_select(0, hit))
            moved = hit.index_select(0, local[:, 0]).mul_(k).add_(local[:, 1])
        self._dense_moves = moved.numel() * 256 > x.numel()
        return moved

    def _native_lib(self, x: torch.Tensor):
        """The native CPU loops (``oscqat.native``) when they apply here, else None (torch ops)."""
        if not self.use_native or x.device.type != "cpu" or self._freq.dtype != torch.float32:
            return None
        if self._flat_w is None or self._flat_w.dtype != torch.float32 or self._flat_w.device.type != "cpu":
            return None
        if self._s_prev is not None and (self._s_prev.dtype != torch.float32 or not self._s_prev.is_contiguous()):
            return None
        return native.load()

    def _moved_native(self, lib, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """``_moved`` in one native pass: a view of a buffer reused at the next update."""
        size = x.element_size()
        args = (x.data_ptr(), prev.data_ptr(), self.numel, self._padded * size // 8, size)
        cap = self._moved_buf.numel()
        n = lib.oscqat_find_moved(*args, self._moved_buf.data_ptr(), cap)
        if n > cap:  # more moved than ever before: grow and search again (nothing was changed)
            self._moved_buf = torch.empty(max(n, 2 * cap), dtype=torch.int64)
            self._osc_buf = torch.empty(self._moved_buf.numel(), dtype=torch.uint8)
            n = lib.oscqat_find_moved(*args, self._moved_buf.data_ptr(), self._moved_buf.numel())
        return self._moved_buf[:n]

    def _update_native(self, lib, moved: torch.Tensor, x: torch.Tensor, missing: list[str], live: bool,
                       old_decay: float) -> None:
        """The moved integers' update of ``_update`` (and, ``live``, the attribution of
        ``_attribute``) in one native loop; the same float32 arithmetic, bit for bit."""
        c = self._constants(x.device)
        attribute = live and self._s_prev is not None
        if attribute:
            flags = [has and not (missing and name in missing) for has, name in zip(self._has_s_prev, self._names)]
            if self._attributable is None or self._attributable[0] != flags:
                self._attributable = (flags, torch.tensor(flags, dtype=torch.uint8))
            attributable, s_prev = self._attributable[1], self._s_prev
        else:
            attributable, s_prev = c["lo"], self._freq  # not read
        n = moved.numel()
        lib.oscqat_update_moved(
            moved.data_ptr(), n, x.element_size(), x.data_ptr(), self._prev.data_ptr(), self._freq.data_ptr(),
            self._last_dir.data_ptr(), self._ema_dev.data_ptr(), self._osc_buf.data_ptr(),
            self.momentum / self._decay, old_decay, int(attribute), self._flat_w.data_ptr(), s_prev.data_ptr(),
            c["starts"].data_ptr(), c["wshift"].data_ptr(), c["per_scale"].data_ptr(), c["scale_starts"].data_ptr(),
            c["lo"].data_ptr(), c["hi"].data_ptr(), attributable.data_ptr(), len(self._layer_list),
            ctypes.addressof(self._n_same), ctypes.addressof(self._n_attributed))
        if attribute:
            self._flips_total += self._n_attributed.value
            same = self._n_same.value
            self._flips_scale = same if self._flips_scale is None else self._flips_scale + same
        self._flipped = moved, self._osc_buf[:n].view(torch.bool)

    def _update(self, x: torch.Tensor, missing: list[str], live: bool = False,
                s_now: torch.Tensor | None = None) -> None:
        if self._prev is None:
            self._prev, self._ema_dev = self._int_buffer(x.device).copy_(x), torch.zeros(x.shape, device=x.device)
            return
        kept = {name: (self.states[name]._slice, self._freq[self.states[name]._slice].clone(),
                       self._last_dir[self.states[name]._slice].clone(),
                       self._ema_dev[self.states[name]._slice].clone()) for name in missing}
        lib = self._native_lib(x)
        moved = self._moved_native(lib, x, self._prev) if lib is not None else self._moved(x, self._prev)
        if moved.numel() and not (lib is not None and live):  # the native update attributes live itself
            self._attribute(moved, missing, live, s_now)
        m = self.momentum
        old_decay = self._decay
        self._decay *= 1.0 - m
        if moved.numel() and lib is not None:
            self._update_native(lib, moved, x, missing, live, old_decay)
        elif moved.numel():
            # index_select / scatter_ / index_add_: 2-4x faster on a CPU than x[idx] and x[idx] = v
            now = x.index_select(0, moved)
            step = now.float().sub_(self._prev.index_select(0, moved))
            self._prev.index_copy_(0, moved, now)  # _prev takes this step's integers: only these differ
            direction = step.sign()
            osc = direction * self._last_dir.index_select(0, moved) < 0
            # f_t = (1-m) f_{t-1} + m o_t  <=>  _freq += m / decay_t where o_t = 1 (adds 0 elsewhere)
            self._freq.index_add_(0, moved, osc.float().mul_(m / self._decay))
            self._flipped = moved, osc
            self._last_dir.scatter_(0, moved, direction)
            # x_ema_t - x_t = (1-m) (x_ema_{t-1} - x_{t-1} - delta)  <=>  _ema_dev -= delta / decay_{t-1}
            self._ema_dev.index_add_(0, moved, step.div_(old_decay), alpha=-1)
        for sl, freq, last_dir, ema_dev in kept.values():  # a layer without a forward keeps its state
            self._freq[sl] = freq * (old_decay / self._decay)
            self._last_dir[sl] = last_dir
            self._ema_dev[sl] = ema_dev * (old_decay / self._decay)
        if kept:
            self._cleared = float("inf")  # their scaled frequencies rose
        if self._decay < 1e-4:  # keep the scaled values well inside float32's range
            self._normalise()

    def _normalise(self) -> None:
        """Fold ``_decay`` into the buffers (two passes), so they hold the plain values."""
        if self._decay != 1.0:
            self._freq.mul_(self._decay)
            if self._ema_dev is not None:
                self._ema_dev.mul_(self._decay)
            self._cleared *= self._decay
            self._decay = 1.0

    def _freeze(self, new_idx: torch.Tensor, incremental: bool = True) -> None:
        """Freeze the weights at flat indices ``new_idx`` (sorted) at their rounded integer EMA.

        Sparse and batched over layers: the mask and integers of all layers are marked in two
        ops on the flat tensors their buffers view (``_link_frozen``), and the latent values go
        to the one pin store. ``incremental`` (an eager step, whose next forward reads each
        layer's sparse index): the touched layers' sparse indices grow by the new entries;
        otherwise (a compiled step, whose graph reads the dense buffers) they are only marked
        stale. The cost grows with the number of newly frozen weights and the layers they sit
        in, not with the model, so freezing a few weights every step stays cheap.
        """
        lib = self._native_lib(new_idx)
        if lib is not None:
            targets, local, counts = self._freeze_native(lib, new_idx)
        else:
            c = self._constants(new_idx.device)
            old_prev = self._prev.index_select(0, new_idx).float()
            targets = torch.round(old_prev + self._ema_dev.index_select(0, new_idx) * self._decay)
            lid = torch.searchsorted(c["starts"], new_idx, right=True).sub_(1)  # each index's layer
            shared = self._bounds()[0]
            if shared is not None:
                targets.clamp_(*shared)
            else:
                targets = torch.clamp(targets, c["lo"].index_select(0, lid), c["hi"].index_select(0, lid))
            # Frozen from the next forward on, the integer never moves again: frequency 0, and the
            # history restarts at the pinned value, so the jump to it is no oscillation.
            self._freq.index_fill_(0, new_idx, 0.0)
            self._last_dir.index_fill_(0, new_idx, 0.0)
            self._frozen_mask.index_fill_(0, new_idx, True)
            ints8 = targets.to(torch.int8)
            self._frozen_int.scatter_(0, new_idx, ints8)
            self._add_pins(self._weight_positions(new_idx, lid))  # at their latent values of this step
            self._prev.scatter_(0, new_idx, ints8 if self._int_dtype == torch.int8 else targets.to(self._int_dtype))
            # the EMA itself is unchanged
            self._ema_dev.index_add_(0, new_idx, (targets - old_prev).div_(self._decay), alpha=-1)
            cuts = torch.searchsorted(new_idx, c["starts"]).tolist()
            counts = [b - a for a, b in zip(cuts, cuts[1:])]
            local = (new_idx - c["starts"].index_select(0, lid)) if incremental else None
        if incremental:  # one split for all layers, not a slice per layer
            local, vals = local.split(counts), targets.split(counts)
        for i, (layer, n) in enumerate(zip(self._layer_list, counts)):
            if n:
                layer.__dict__["_any_frozen"] = True
                if incremental and not layer._sparse_stale:  # an eager step: its next forward reads it
                    layer._append_sparse(local[i], vals[i])
                else:  # a compiled step reads the dense buffers; an eager forward rebuilds it
                    layer.__dict__["_sparse_stale"] = True

    def _freeze_native(self, lib, new_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The torch half of ``_freeze`` in one native loop (bit for bit); returns the pinned
        integers (float), each index's position in its layer and each layer's count."""
        c = self._constants(new_idx.device)
        k, n = new_idx.numel(), self._n_pins
        self._reserve_pins(k, new_idx.device)
        targets = torch.empty(k)
        local = torch.empty(k, dtype=torch.int64)
        counts = torch.empty(len(self._layer_list), dtype=torch.int64)
        lib.oscqat_freeze(
            new_idx.data_ptr(), k, self._prev.element_size(), self._prev.data_ptr(), self._ema_dev.data_ptr(),
            self._decay, self._freq.data_ptr(), self._last_dir.data_ptr(), self._frozen_mask.data_ptr(),
            self._frozen_int.data_ptr(), c["starts"].data_ptr(), c["wshift"].data_ptr(), c["lo"].data_ptr(),
            c["hi"].data_ptr(), len(self._layer_list), self._flat_w.data_ptr(), self._pin_pos[n:].data_ptr(),
            self._pin_latent[n:].data_ptr(), targets.data_ptr(), local.data_ptr(), counts.data_ptr())
        self._n_pins = n + k
        return targets, local, counts.tolist()

    def _candidates(self, moved: torch.Tensor, osc: torch.Tensor, scaled: float) -> torch.Tensor:
        """The freeze candidates among the last update's moves: those that oscillated and whose
        (scaled) frequency now exceeds ``scaled``."""
        lib = self._native_lib(moved)
        if lib is None or not (moved.is_contiguous() and osc.is_contiguous()):
            return moved[osc.logical_and_(self._freq.index_select(0, moved) > scaled)]
        if self._cand_buf.numel() < moved.numel():
            self._cand_buf = torch.empty(moved.numel(), dtype=torch.int64)
        n = lib.oscqat_candidates(moved.data_ptr(), moved.numel(), osc.data_ptr(), self._freq.data_ptr(), scaled,
                                  self._cand_buf.data_ptr())
        return self._cand_buf[:n]

    def _bounds(self):
        """``(shared (n, p) or None, per-layer list)``: one clamp when all layers share bits."""
        if self._bounds_cache is None:
            per_layer = [layer.weight_quantizer.bounds for layer in self.layers.values()]
            shared = per_layer[0] if len(set(per_layer)) == 1 else None
            self._bounds_cache = (shared, per_layer)
        return self._bounds_cache

    def _constants(self, device: torch.device) -> dict:
        """Per-layer constants as tensors on ``device`` (for lookups by each index's layer):
        flat starts, weights per scale entry, scale offsets and grid bounds."""
        if self._consts is None or self._consts["starts"].device != device:
            bounds = self._bounds()[1]
            self._consts = {
                "starts": torch.tensor(self._starts, device=device),
                "wshift": torch.tensor([w - s for w, s in zip(self._wstarts, self._starts)], device=device),
                "per_scale": torch.tensor(self._per_scale, device=device),
                "scale_starts": torch.tensor(self._scale_starts[:-1], device=device),
                "lo": torch.tensor([float(n) for n, _ in bounds], device=device),
                "hi": torch.tensor([float(p) for _, p in bounds], device=device),
            }
        return self._consts

    # reporting -------------------------------------------------------------
    @torch.no_grad()
    def summary(self) -> dict:
        """Oscillating and frozen fractions: overall, depthwise, pointwise and per layer."""
        groups = {"all": [0, 0, 0], "depthwise": [0, 0, 0], "pointwise": [0, 0, 0]}
        per_layer = {}
        for name, layer in self.layers.items():
            st = self.states[name]
            total = st.freq.numel()
            # frozen weights no longer oscillate (their frequency only decays): count them as frozen
            osc = int(((st.freq > self.report_threshold) & ~layer.frozen_mask).sum())
            frozen = int(layer.frozen_mask.sum())
            kind = layer_kind(layer)
            per_layer[name] = {
                "kind": kind,
                "bits": layer.weight_bits,
                "numel": total,
                "osc_frac": osc / total,
                "frozen_frac": frozen / total,
                "mean_freq": float(st.freq.mean()),
            }
            for key in ("all", kind):
                if key in groups:
                    g = groups[key]
                    g[0] += osc
                    g[1] += frozen
                    g[2] += total

        def frac(key: str, idx: int) -> float:
            return groups[key][idx] / groups[key][2] if groups[key][2] else 0.0

        return {
            "osc_frac": frac("all", 0),
            "osc_frac_depthwise": frac("depthwise", 0),
            "osc_frac_pointwise": frac("pointwise", 0),
            "frozen_frac": frac("all", 1),
            "frozen_frac_depthwise": frac("depthwise", 1),
            "frozen_frac_pointwise": frac("pointwise", 1),
            "tracked_weights": groups["all"][2],
            "layers": per_layer,
        }

    # persistence -------------------------------------------------------------
    def state_dict(self) -> dict:
        out = {"steps": self.steps, "momentum": self.momentum, "layers": {},
               # the last forward's scales, so a resumed run attributes its first update too
               "scale_prev": self._scale_prev_by_layer()}
        for name, st in self.states.items():
            out["layers"][name] = {
                key: (None if (value := getattr(st, key)) is None else value.clone()) for key in STATE_KEYS
            }
        return out

    def _scale_prev_by_layer(self) -> dict[str, torch.Tensor]:
        """The previous forward's scales per layer (shaped like the broadcast scale; copies)."""
        if self._s_prev is None:
            return {}
        return {name: self._s_prev[self._scale_starts[i]:self._scale_starts[i + 1]].reshape(self._scale_shapes[i]).clone()
                for i, name in enumerate(self.layers) if self._has_s_prev[i]}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self._observed = False
        if self.layers and not self._frozen_linked():  # the model's load wrote into these
            self._link_frozen()
        if self.layers and not self._weights_linked():
            self._link_weights()
        saved_scales = state.get("scale_prev", {})
        self._has_s_prev = [name in saved_scales for name in self.layers]
        self._s_prev = None
        if any(self._has_s_prev):
            self._s_prev = torch.cat([
                saved_scales[name].to(self._freq.device).reshape(-1) if name in saved_scales
                else torch.ones(self._scale_starts[i + 1] - self._scale_starts[i], device=self._freq.device)
                for i, name in enumerate(self.layers)])
        missing = set(self.states) - set(state["layers"])
        if missing:
            raise KeyError(f"tracker state lacks layers: {sorted(missing)[:5]}")
        saved = {name: state["layers"][name] for name in self.states}
        has_prev = [entry.get("prev_int") is not None for entry in saved.values()]
        self._decay = 1.0
        self._cleared = float("inf")
        if any(has_prev):
            self._prev = self._int_buffer(self._freq.device)
            for layer, lo, hi in zip(self._layer_list, self._starts, self._starts[1:]):
                self._prev[lo:hi].copy_(layer.weight_int().reshape(-1))
            self._ema_dev = torch.zeros(self.numel, device=self._freq.device)
        else:
            self._prev = self._ema_dev = None
        for name, st in self.states.items():
            entry, layer = saved[name], self.layers[name]
            device = layer.weight.device
            st.freq.copy_(entry["freq"])
            st.last_dir.copy_(entry["last_dir"])  # older checkpoints stored int8 directions
            if entry.get("prev_int") is not None:
                st.prev_int.copy_(entry["prev_int"])
                if entry.get("int_ema") is not None:
                    self._ema_dev[st._slice] = (entry["int_ema"].to(device) - st.prev_int).reshape(-1)
            latent = entry.get("frozen_latent")
            if latent is not None and layer._any_frozen:  # after the model's load (which took the weights)
                w = layer.weight.detach()
                w.copy_(torch.where(layer.frozen_mask, latent.to(w).reshape(w.shape), w))
            st.freq.masked_fill_(layer.frozen_mask, 0.0)  # no-op for this version's states
        # pin what the weights hold now (the saved latent values), from the masks the load took
        self._seen_versions = [layer._frozen_version for layer in self._layer_list]
        self._rebuild_pins()
