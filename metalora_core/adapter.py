"""The three-layer Meta-LoRA adapter: ``delta_W = scale * Up @ Mid @ Down``.

``Down`` (LoMD, ``rank_down x in``) is meta-learned once and shared by every identity; ``Mid`` (LoM,
``rank_mid x rank_down``) and ``Up`` (LoU, ``out x rank_mid``) are trained per identity. ``Up`` starts at
zero, so a fresh identity changes nothing.

``scale = alpha / rank_down``: the usual LoRA convention, where the divisor is the rank of ``delta_W``
(``rank_down`` is the bottleneck). With the default ``alpha = rank_down`` the scale is 1. Because
``Up @ Mid`` collapses into one ``out x rank_down`` matrix, every identity folds *exactly* into a standard
rank-``rank_down`` LoRA (see :func:`fold_to_lora`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AdapterShape:
    """Ranks and scaling shared by a LoMD and every identity trained against it."""

    rank_down: int = 4
    rank_mid: int = 16
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.rank_down < 1 or self.rank_mid < 1:
            raise ValueError(f"ranks must be >= 1, got rank_down={self.rank_down}, rank_mid={self.rank_mid}")

    @property
    def effective_alpha(self) -> float:
        return float(self.rank_down if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return self.effective_alpha / self.rank_down


def delta_weight(down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense ``out x in`` weight change of one adapter (reference math; inference patches use it).

    ``(Up @ Mid) @ Down`` costs ``out * rank_down * in`` multiply-adds, ``rank_mid / rank_down`` times
    fewer than ``Up @ (Mid @ Down)``.
    """
    return (scale * (up @ mid)) @ down


def fold_to_lora(
    down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold into a standard LoRA pair ``(lora_up, lora_down)`` with ``lora_up @ lora_down == delta_W``.

    The scale is baked into ``lora_up`` so the pair is exact for loaders that ignore ``alpha`` (peft) and,
    with ``alpha = rank_down`` written beside it, for loaders that apply ``alpha / rank`` (kohya, ComfyUI).
    """
    return scale * (up @ mid), down.clone()


def merge_into(weight: torch.Tensor, delta: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Add ``strength * delta`` to ``weight`` in place, computing in float32 or better."""
    work = torch.promote_types(weight.dtype, torch.float32)
    weight.copy_((weight.to(work) + strength * delta.to(work)).to(weight.dtype))
    return weight


def unmerge_from(weight: torch.Tensor, delta: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`merge_into` (exact up to the weight dtype's rounding)."""
    return merge_into(weight, delta, -strength)


class IdentityHead(nn.Module):
    """One target's adapter: shared ``down`` plus trainable ``mid`` and ``up``.

    ``down`` given as a tensor is copied into a frozen buffer (personalization). Given as an
    ``nn.Parameter`` it is kept as that very Parameter, so many identities' heads share one trainable Down
    (stage-1 meta-training, where the Down is what is learned).

    A head is owned per *canonical* (BFL-named) target. Layers that diffusers splits out of a fused layer
    (``to_q``/``to_k``/``to_v``/``proj_mlp``) share one head and read a row slice of ``up``, so their
    gradients accumulate into the same parameters and the result equals the fused adapter exactly.
    """

    def __init__(
        self,
        down: torch.Tensor,
        out_features: int,
        rank_mid: int,
        scale: float,
        mid_init: torch.Tensor | None = None,
        up_init: torch.Tensor | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        rank_down, _ = down.shape
        if isinstance(down, nn.Parameter):
            self.down = down
        else:
            self.register_buffer("down", down.detach().clone(), persistent=True)
        if mid_init is None:
            mid_init = torch.empty(rank_mid, rank_down, dtype=down.dtype)
            nn.init.kaiming_uniform_(mid_init, a=5**0.5)
        if up_init is None:
            up_init = torch.zeros(out_features, rank_mid, dtype=down.dtype)
        self.mid = nn.Parameter(mid_init.detach().clone().to(down.dtype))
        self.up = nn.Parameter(up_init.detach().clone().to(down.dtype))
        if tuple(self.mid.shape) != (rank_mid, rank_down) or tuple(self.up.shape) != (out_features, rank_mid):
            raise ValueError(
                f"mid {tuple(self.mid.shape)} / up {tuple(self.up.shape)} do not fit "
                f"rank_down={rank_down}, rank_mid={rank_mid}, out={out_features}"
            )
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._pieces: set[tuple[int, int]] = set()  # row spans of the attached layers reading this head
        self._split: list[tuple[int, int]] = []  # the same spans when they tile Up's rows (Up is split once)
        self._memo: _Memo | None = None  # the current forward's shared product
        self._down_cast: tuple | None = None  # a frozen Down in the compute dtype

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """``Mid (Down (dropout x))``: the rank-``rank_mid`` activations every output row is built from."""
        return F.linear(F.linear(self.dropout(x).to(self.mid.dtype), self.down), self.mid)

    def up_rows(self, rows: slice | None) -> torch.Tensor:
        return self.up if rows is None else self.up[rows]

    def forward(self, x: torch.Tensor, rows: slice | None = None, strength: float = 1.0) -> torch.Tensor:
        """The adapter's contribution ``scale * Up[rows] (Mid (Down (dropout x)))`` for input ``x``."""
        return (self.scale * strength) * F.linear(self.low_rank(x), self.up_rows(rows))

    # -- the bypass path: one low-rank product per input, shared by every piece of a fused layer ---------

    def register_rows(self, rows: slice | None) -> None:
        """Note that a layer reading ``Up[rows]`` of this head is attached (diffusers' q/k/v, proj_mlp)."""
        if rows is not None:
            self._pieces.add((rows.start, rows.stop))
            spans = sorted(self._pieces)
            tiles = spans[0][0] == 0 and spans[-1][1] == self.up.shape[0]
            tiles = tiles and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            self._split = spans if tiles else []
        self.clear_memo()

    def __getstate__(self) -> dict:
        """Copies and pickles of a head leave out the per-forward caches (they hold autograd tensors)."""
        return {**self.__dict__, "_memo": None, "_down_cast": None}

    def clear_memo(self) -> None:
        """Forget the last forward's shared product (heads are detached, or their weights were replaced)."""
        self._memo = None

    def _down_in(self, dtype: torch.dtype) -> torch.Tensor:
        """Down in the compute dtype; a frozen Down is cast once, not once per forward."""
        if self.down.requires_grad or self.down.dtype == dtype:
            return _as(self.down, dtype)
        cached = self._down_cast
        key = (dtype, self.down.device, self.down._version, self.down.data_ptr())
        if cached is None or cached[0] != key:
            cached = (key, self.down.detach().to(dtype))
            self._down_cast = cached
        return cached[1]

    def _operands(self, x: torch.Tensor, dtype: torch.dtype) -> _Memo:
        """``h = Mid Down x`` (2-D) and the ``Up`` row blocks, in ``dtype``, for the input ``x``.

        The pieces of one fused layer (diffusers' ``to_q``/``to_k``/``to_v`` of BFL's ``qkv``, and
        ``proj_mlp`` of ``linear1``) are called one after the other with the very same input tensor, so
        the product is computed by the first and reused by the others (and then dropped): one low-rank path
        per fused target, as the fused layer itself would run. ``Up`` is split once along the pieces' rows
        (:meth:`register_rows` decided how), so backward assembles its gradient with one concatenation
        instead of one zero-filled copy per piece.
        """
        memo = self._memo
        if memo is not None and memo.matches(x, dtype, self):
            memo.left -= 1
            if memo.left <= 0:  # the last piece has it: keep nothing past the forward (see below)
                self._memo = None
            return memo
        h = F.linear(F.linear(_as(self.dropout(x), dtype), self._down_in(dtype)), _as(self.mid, dtype))
        up = _as(self.up, dtype)
        blocks: dict[tuple[int, int] | None, torch.Tensor] = {None: up}
        if self._split:
            blocks.update(zip(self._split, up.split([b - a for a, b in self._split])))
        memo = _Memo(x, dtype, self, h.reshape(-1, h.shape[-1]), up, blocks)
        # Held only until every piece has read it. Held longer, a product computed in a checkpoint's
        # recompute would keep that recompute's whole graph, and with it the block's activations, alive.
        memo.left = max(1, len(self._pieces)) - 1
        self._memo = memo if memo.left > 0 else None
        return memo

    def add_into(
        self, y: torch.Tensor, x: torch.Tensor, rows: slice | None = None, strength: float = 1.0
    ) -> torch.Tensor:
        """``y + forward(x, rows, strength)``, computed in ``y``'s dtype as one fused ``addmm``.

        The adapter runs in the layer's own compute dtype (bf16 on a GPU), its weights stay in their
        training dtype (float32) and are cast once per forward, as autocast would: two fewer full passes
        over the layer's output than a separate sum, and the low-rank product shared by the pieces of a
        fused layer (:meth:`_operands`). In float32 / float64 nothing is cast.
        """
        dtype = y.dtype
        memo = self._operands(x, dtype)
        up = memo.rows(rows)
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), memo.h, up.t(), alpha=self.scale * strength)
        return flat.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.down, self.mid, self.up, self.scale)


class BypassLinear(nn.Module):
    """``y = base(x) + head(x)[rows]``: the adapter runs beside a linear layer and never touches its weight.

    Gradients flow through rank-``rank_down``/``rank_mid`` activations only and the base weight may be any
    dtype (fp8 or quantized bases work because the base module is called, not read).
    """

    def __init__(self, base: nn.Module, head: IdentityHead, rows: slice | None = None) -> None:
        super().__init__()
        self.base = base
        self.head = head
        self.rows = rows
        self.strength = 1.0
        self.enabled = True
        head.register_rows(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled or self.strength == 0.0:
            return y
        return self.head.add_into(y, x, self.rows, self.strength)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; no op at all when it already is (a step runs this hundreds of times)."""
    return t if t.dtype == dtype else t.to(dtype)


class _Memo:
    """The shared low-rank product of one head for one input tensor (held by weak reference)."""

    def __init__(self, x, dtype, head: IdentityHead, h, up, blocks) -> None:
        self.x, self.version, self.dtype = weakref.ref(x), x._version, dtype
        self.weights = (head.mid._version, head.up._version, head.down._version)
        self.grad = torch.is_grad_enabled()
        self.h, self.up, self.blocks = h, up, blocks
        self.left = 0  # pieces still to read it

    def matches(self, x: torch.Tensor, dtype: torch.dtype, head: IdentityHead) -> bool:
        return (
            self.x() is x
            and self.version == x._version
            and self.dtype == dtype
            and self.grad == torch.is_grad_enabled()
            and self.weights == (head.mid._version, head.up._version, head.down._version)
        )

    def rows(self, rows: slice | None) -> torch.Tensor:
        if rows is None:
            return self.up
        block = self.blocks.get((rows.start, rows.stop))
        return block if block is not None else self.up[rows]
