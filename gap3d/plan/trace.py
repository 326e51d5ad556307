"""Analytic cost of the aligner, traced on fake tensors through the real model code.

A training step of the real parts (``AlignerNet`` + ``FlowMatching.loss`` + AdamW + ``EMA``,
in the order Lightning runs them, bf16 autocast where the precision says so) is executed under
``FakeTensorMode``: every op runs its shape/dtype logic and kernel choice for the CPU backend,
but no data is computed or stored. One dispatch-level observer, :class:`LiveBytes`, watches
it: it keeps the bytes of every live tensor storage and their peak (the quantity
``torch.cuda.max_memory_allocated`` reports on a GPU, minus allocator rounding) and counts
matrix FLOPs with PyTorch's own formulas (``torch.utils.flop_counter``), forward + backward
(+ the recomputed forward under gradient checkpointing).

So memory and FLOPs follow the code as it is (a new layer, a different attention kernel), at
any batch size, for models that would not fit this machine. Fake ops cost per op, not per
byte; a full-depth trace of the paper aligner takes ~10 s, so traces run at depths 2 and 3 and
are extrapolated linearly in depth from depths 2 and 3 (exact for FLOPs and saved activations; the tests check
the extrapolation against full traces). Attention kernels are the CPU ones (flash attention
for float32/bf16), which keep the same O(T) state as the GPU flash kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import weakref
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gap3d.config import AlignerConfig, LossWeights
from gap3d.layout import TokenLayout


def _cpu_flash_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query.shape, key.shape, value.shape))


def _cpu_flash_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any
) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return int(sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape))


def _flop_formulas() -> dict[Any, Any]:
    """PyTorch's FLOP formulas, plus the CPU flash-attention kernels it does not list (its
    FlopCounterMode decomposes those into the math kernel instead)."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    table = dict(flop_registry)
    for name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward_flops),
    ):
        if hasattr(aten, name):
            table[getattr(aten, name)] = fn
    return table


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages seen by the dispatcher and their peak; matrix FLOPs.

    One lightweight mode on purpose: ``FlopCounterMode`` attributes FLOPs to modules with
    hooks that keep recomputed tensors alive, which hides what gradient checkpointing saves.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, Any] = {}
        self._formulas = _flop_formulas()
        self.current = 0
        self.peak = 0
        self.flops = 0

    def add(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        n = int(st.nbytes())

        def gone(_ref: Any, key: int = key, n: int = n) -> None:
            if self._live.pop(key, None) is not None:
                self.current -= n

        self._live[key] = weakref.ref(st, gone)
        self.current += n
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self._formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        if isinstance(out, torch.Tensor):
            self.add(out)
        else:
            for t in tree_flatten(out)[0]:
                self.add(t)
        return out


def _fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def autocast_for(precision: str, device_type: str = "cpu") -> Any:
    """The autocast context Lightning's precision plugin uses for ``precision``."""
    if precision.startswith("bf16"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device_type, dtype=torch.float16)
    return nullcontext()


@dataclasses.dataclass(frozen=True)
class AlignerCase:
    """Everything a traced aligner step depends on (hashable, for the cache)."""

    layout: tuple[int, int, int, int, int]  # n_cls, n_registers, grid_h, grid_w, channels
    prompt_len: int
    prompt_dim: int
    aligner: str  # AlignerConfig as sorted JSON
    batch: int
    grad_ckpt: bool
    precision: str  # "32-true" | "bf16-mixed" | "16-mixed"
    weight_decay: float = 0.0

    @classmethod
    def make(
        cls,
        layout: TokenLayout,
        prompt_len: int,
        prompt_dim: int,
        aligner: AlignerConfig,
        batch: int,
        grad_ckpt: bool = False,
        precision: str = "32-true",
        weight_decay: float = 0.0,
    ) -> AlignerCase:
        lay = (layout.n_cls, layout.n_registers, layout.grid_h, layout.grid_w, layout.channels)
        a = json.dumps(dataclasses.asdict(aligner), sort_keys=True)
        return cls(lay, prompt_len, prompt_dim, a, batch, grad_ckpt, precision, weight_decay)

    def aligner_cfg(self, depth: int | None = None) -> AlignerConfig:
        d = json.loads(self.aligner)
        if depth is not None:
            from gap3d.trainer.model import resolve_aligner_size

            sizes = resolve_aligner_size(AlignerConfig(**d))
            d.update(width=sizes["width"], heads=sizes["heads"], mlp_ratio=sizes["mlp_ratio"])
            d["depth"] = depth
        return AlignerConfig(**d)

    @property
    def token_layout(self) -> TokenLayout:
        return TokenLayout(*self.layout)


def _build(case: AlignerCase, depth: int) -> tuple[Any, Any]:
    from gap3d.trainer.flow import FlowMatching
    from gap3d.trainer.model import AlignerNet

    lay = case.token_layout
    net = AlignerNet(lay, case.prompt_dim, case.aligner_cfg(depth))
    return net, FlowMatching(net, lay, LossWeights())


def _inputs(case: AlignerCase, batch: int) -> tuple[Any, Any, Any]:
    lay = case.token_layout
    x0 = torch.randn(batch, lay.n_tokens, lay.channels)
    cond = torch.randn(batch, case.prompt_len, case.prompt_dim)
    mask = torch.ones(batch, case.prompt_len, dtype=torch.bool)
    return x0, cond, mask


def _param_bytes(net: Any) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# A small on-disk cache: a trace is a pure function of the case, the depth and the code.
# ---------------------------------------------------------------------------------------------

_CODE_MODULES = (
    "gap3d.trainer.model",
    "gap3d.trainer.layers",
    "gap3d.trainer.resampler",
    "gap3d.trainer.flow",
    "gap3d.trainer.ema",
    "gap3d.plan.trace",
)


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    import hashlib
    import importlib
    import inspect

    h = hashlib.sha256(torch.__version__.encode())
    for name in _CODE_MODULES:
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    return h.hexdigest()[:16]


def _cache_file() -> Any:
    from gap3d.encoders.tiny import cache_root

    return cache_root() / "plan" / "traces.json"


def _disk_cached(fn: Any) -> Any:
    """Cache ``fn(case, *args) -> dict`` in ``$GAP3D_CACHE/plan/traces.json`` (and memory)."""

    @functools.lru_cache(maxsize=512)
    def wrapper(case: AlignerCase, *args: Any) -> dict[str, float]:
        key = json.dumps([fn.__name__, dataclasses.asdict(case), args, _code_hash()])
        path = _cache_file()
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        if key in table:
            return table[key]
        value = fn(case, *args)
        try:  # re-read: another process may have added entries meanwhile
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[key] = value
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs time
        return value

    return wrapper


@_disk_cached
def _trace_train(case: AlignerCase, depth: int) -> dict[str, float]:
    """One fake training step, as Lightning runs it (optimiser state already allocated)."""
    from gap3d.trainer.ema import EMA

    with _fake_mode():
        net, flow = _build(case, depth)
        net.train()
        net.grad_checkpointing = case.grad_ckpt
        ema = EMA(net, 0.999, warmup=True)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=case.weight_decay)
        live = LiveBytes()
        for p in net.parameters():
            live.add(p)
        for t in ema.shadow.values():
            live.add(t)
        for b in net.buffers():
            live.add(b)
        # The optimiser state exists from the first step on: create it with zero gradients
        # (an AdamW step on zero gradients allocates exactly what a real first step does).
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for st in opt.state.values():
            for v in st.values():
                live.add(v)
        x0, cond, mask = _inputs(case, case.batch)
        with live:
            live.reset_peak()
            live.flops = 0
            before = live.current
            with autocast_for(case.precision):
                loss, _ = flow.loss(x0, cond, mask)
            # what the forward leaves alive for the backward (saved activations, casts)
            saved = live.current - before
            loss.backward()
            flops = live.flops
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(net)
        p_bytes = _param_bytes(net)
        n_params = sum(p.numel() for p in net.parameters())
        return {
            "flops": float(flops),
            "peak": float(live.peak),
            "saved": float(saved),
            "params": float(n_params),
            "weights": float(p_bytes),
            # AdamW keeps exp_avg and exp_avg_sq in the parameters' dtype (+ a step scalar).
            "optimizer": float(2 * p_bytes),
            "ema": float(sum(t.numel() * t.element_size() for t in ema.shadow.values())),
            "grads": float(p_bytes),
        }


@_disk_cached
def _trace_sample(case: AlignerCase, depth: int, cfg_scale: float) -> dict[str, float]:
    """One guided Euler velocity evaluation (``FlowMatching.velocity``) at ``case.batch``."""
    with _fake_mode():
        net, flow = _build(case, depth)
        net.eval()
        live = LiveBytes()
        for p in net.parameters():
            live.add(p)
        x, cond, mask = _inputs(case, case.batch)
        t = torch.rand(case.batch)
        with live, torch.no_grad(), autocast_for(case.precision):
            live.reset_peak()
            live.flops = 0
            flow.velocity(x, t, cond, mask, cfg_scale)
        return {"flops": float(live.flops), "peak": float(live.peak)}


def _extrapolate(f2: dict[str, float], f3: dict[str, float], depth: int) -> dict[str, float]:
    """Linear in depth through the traces at depths 2 and 3 (depth 1 has no "previous block"
    whose gradients are alive during a block's backward, so it is not on the line)."""
    return {k: f2[k] + (f3[k] - f2[k]) * (depth - 2) for k in f2}


def _depth(case: AlignerCase) -> int:
    from gap3d.trainer.model import resolve_aligner_size

    return int(resolve_aligner_size(case.aligner_cfg())["depth"])


def trace_train_step(case: AlignerCase, full: bool = False) -> dict[str, float]:
    """Traced cost of one training step at ``case`` (per device).

    Returns ``flops`` (forward + backward [+ recompute]), ``peak`` (bytes of live tensors at
    the step's peak, weights/optimiser/EMA included), ``saved`` (bytes the forward leaves alive
    for the backward: saved activations and low-precision weight casts), and the static parts ``weights``, ``grads``,
    ``optimizer``, ``ema`` (bytes) and ``params`` (count). ``full=True`` traces every block
    instead of extrapolating from depths 1 and 2.
    """
    depth = _depth(case)
    if full or depth <= 3:
        return dict(_trace_train(case, depth))
    return _extrapolate(_trace_train(case, 2), _trace_train(case, 3), depth)


def trace_sample_step(case: AlignerCase, cfg_scale: float, full: bool = False) -> dict[str, float]:
    """Traced cost of one Euler step of sampling (``flops``, ``peak`` bytes) at ``case.batch``
    prompts (the guided step runs the network on ``2 * batch`` rows when ``cfg_scale != 1``)."""
    depth = _depth(case)
    if full or depth <= 3:
        return dict(_trace_sample(case, depth, cfg_scale))
    return _extrapolate(_trace_sample(case, 2, cfg_scale), _trace_sample(case, 3, cfg_scale), depth)
