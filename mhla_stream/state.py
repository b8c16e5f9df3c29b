"""Per-layer streaming state of the MHLA operator (SPEC section 1, decode form).

Preallocated tensors with explicit positions, so a decode step only writes in place
(and can be captured in a CUDA graph). For a batch of ``B`` sequences and ``H`` heads:

    ring    [B, H, W, K, V]  summaries S_j of the last W = max(L-1, 1) completed blocks, slot j % W,
                             stored in ``state_dtype`` (fp32 by default, or bf16)
    far     [B, H, K, V]     sum of the summaries evicted from the ring (policy window+far only)
    prefix  [B, H, K, V]     P_i, the mixed prefix of the current block i
    partial [B, H, K, V]     R: sum of k v^T over the tokens of block i before ``partial_end``
    open_keys   [B, H, C, K] the later tokens of block i (features of k, and v), each at slot
    open_values [B, H, C, V] position % C (the "token form" of the open block, below)
    partial_end [B, 2] int64 the position up to which R holds block i, at column pos % 2
    pos     [B] int64        tokens seen by each sequence (its current block is pos // C)

Why two forms of the open block: R is [K, V] per head, so updating it costs a read and a write
of 2 * K * V * 4 bytes per token, the largest traffic of a decode step at large batches. There
the Triton decode kernel appends the token's k and v to the open buffers instead (1.5 KB a head),
reads only the slots filled so far, and forms ``R + sum_s k_s v_s^T`` once, when the block
closes. At small batches (latency bound) it keeps R, and first folds in any tokens left in the
buffers (a stream that moved between batch sizes). The open block is, with ``lo = partial_end -
i * C`` clamped to [0, C]: R if ``lo > 0`` (else zero) plus the buffered slots [lo, pos - i * C).
``partial_end`` has two columns so that a kernel reads the one of this step's parity and writes
the other: no program reads a value another program of the same launch writes. Every other form
(prefill, the torch and numba decode) works on R alone: ``settle_`` folds the buffer in first.

The number of far blocks is derived from ``pos`` (``completed - W``), so it is not stored.
Memory is O(L * K * V) per head per sequence however long the stream runs.

State storage (``state_dtype``): the ring is ~94% of the state, so it alone may be stored in
bf16 (SPEC section 1 allows narrower storage of completed summaries as a measured opt-in).
The rule every form follows: a completed block summary S_j is rounded to the storage dtype when
it completes, and every later use of S_j (the mixed prefixes, the far sum) reads the rounded
value. ``far``, ``prefix`` and ``partial`` stay fp32 and every sum is formed in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .mixing import check_policy, has_far

STATE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_state_dtype(state_dtype) -> torch.dtype:
    """The ring's storage dtype from ``None`` (fp32), a torch dtype or one of the names
    ``STATE_DTYPES``; anything else is a ValueError."""
    if state_dtype is None:
        return torch.float32
    if isinstance(state_dtype, torch.dtype):
        if state_dtype in (torch.float32, torch.bfloat16):
            return state_dtype
    elif isinstance(state_dtype, str) and state_dtype in STATE_DTYPES:
        return STATE_DTYPES[state_dtype]
    raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16 (or one of {', '.join(STATE_DTYPES)}), "
                     f"got {state_dtype!r:.60}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class MHLAState:
    ring: torch.Tensor
    far: torch.Tensor
    prefix: torch.Tensor
    partial: torch.Tensor
    open_keys: torch.Tensor
    open_values: torch.Tensor
    partial_end: torch.Tensor
    pos: torch.Tensor
    block_size: int
    num_blocks: int  # L, the trained blocks of the mixing matrix
    policy: str

    # the tensors that make up the state, in this order: what clone/copy_/nbytes and the state
    # files (``StreamingMHLA.save_state``) iterate over
    TENSORS = ("ring", "far", "prefix", "partial", "open_keys", "open_values", "partial_end", "pos")

    @classmethod
    def empty(cls, batch_size: int, num_heads: int, key_dim: int, value_dim: int, *, block_size: int = 64,
              num_blocks: int, policy: str, device=None, state_dtype=None) -> "MHLAState":
        """Zeroed state; ``state_dtype`` (None = fp32, or bf16) is the ring's storage dtype."""
        check_policy(policy)
        ring_dtype = resolve_state_dtype(state_dtype)
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"block_size and num_blocks must be >= 1, got {block_size} and {num_blocks}")
        B, H, K, V = batch_size, num_heads, key_dim, value_dim
        W = max(num_blocks - 1, 1)
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        far = z(B, H, K, V) if has_far(policy) else z(B, H, 0, V)
        ring = torch.zeros(B, H, W, K, V, dtype=ring_dtype, device=device)
        C = block_size
        pos = lambda *s: torch.zeros(B, *s, dtype=torch.int64, device=device)  # noqa: E731
        return cls(ring, far, z(B, H, K, V), z(B, H, K, V), z(B, H, C, K), z(B, H, C, V), pos(2), pos(),
                   block_size, num_blocks, policy)

    @classmethod
    def empty_layers(cls, n_layers: int, batch_size: int, *args, **kwargs) -> list["MHLAState"]:
        """``n_layers`` zeroed states (arguments as ``empty``) whose tensors are consecutive slices of one
        tensor per field, so that ``stacked`` can see every layer's field as one [n_layers, B, ...] tensor:
        an operation over all layers is then one launch, not one a layer (the server's placement)."""
        big = cls.empty(n_layers * batch_size, *args, **kwargs)
        return [big.select(slice(i * batch_size, (i + 1) * batch_size)) for i in range(n_layers)]

    @staticmethod
    def stacked(states: list["MHLAState"], name: str) -> torch.Tensor | None:
        """Field ``name`` of every state as one [n_layers, B, ...] view, when the states come from
        ``empty_layers`` (consecutive slices of one storage); None otherwise."""
        ts = [getattr(st, name) for st in states]
        first, step = ts[0], ts[0].numel()
        if step == 0 and all(t.shape == first.shape for t in ts):  # a field with no elements (far of "window")
            return first.new_empty((len(ts), *first.shape))
        same = all(t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype
                   and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   and t.storage_offset() == first.storage_offset() + i * step for i, t in enumerate(ts))
        if not same:
            return None
        return first.as_strided((len(ts), *first.shape), (step, *first.stride()), first.storage_offset())

    # -- shape facts ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.ring.shape[0]

    @property
    def num_heads(self) -> int:
        return self.ring.shape[1]

    @property
    def window(self) -> int:
        return self.ring.shape[2]

    @property
    def key_dim(self) -> int:
        return self.ring.shape[3]

    @property
    def value_dim(self) -> int:
        return self.ring.shape[4]

    @property
    def device(self) -> torch.device:
        return self.ring.device

    @property
    def state_dtype(self) -> torch.dtype:
        """Storage dtype of the completed summaries (the ring); everything else is fp32."""
        return self.ring.dtype

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.TENSORS)

    # -- whole-state operations ----------------------------------------------------------------
    def _map(self, fn) -> "MHLAState":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        kw.update({n: fn(getattr(self, n)) for n in self.TENSORS})
        return MHLAState(**kw)

    def clone(self) -> "MHLAState":
        return self._map(lambda t: t.clone())

    def to(self, device) -> "MHLAState":
        """The same state on ``device`` (dtypes kept: a ring is never re-rounded or widened here)."""
        return self._map(lambda t: t.to(device))

    def select(self, index) -> "MHLAState":
        """Views of some sequences (``index`` a slice); in-place updates write through."""
        return self._map(lambda t: t[index])

    def copy_(self, other: "MHLAState") -> "MHLAState":
        """Overwrites this state with ``other``; both must store the ring in the same dtype (a
        silent conversion would round or widen completed summaries). Checked before any copy."""
        if other.state_dtype != self.state_dtype:
            raise ValueError(f"cannot copy a state whose ring is {dtype_name(other.state_dtype)} into one whose ring "
                             f"is {dtype_name(self.state_dtype)}")
        for n in self.TENSORS:
            getattr(self, n).copy_(getattr(other, n))
        return self

    def zero_(self) -> "MHLAState":
        for n in self.TENSORS:
            getattr(self, n).zero_()
        return self

    # -- the open block's two forms --------------------------------------------------------------
    def _open_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] start of each row's current block and the position up to which R holds it (the
        column of ``partial_end`` a kernel reads at this position's parity)."""
        start = self.pos - self.pos % self.block_size
        return start, self.partial_end.gather(1, (self.pos % 2)[:, None])[:, 0]

    def buffered_slots(self) -> torch.Tensor:
        """[B, C] bool: the open-buffer slots that hold tokens of the current block not in R,
        [partial_end - i * C, pos - i * C) for the current block i (no host sync)."""
        C = self.block_size
        start, end = self._open_block()
        lo = (end - start).clamp(0, C)
        s = torch.arange(C, device=self.pos.device)
        return (s[None, :] >= lo[:, None]) & (s[None, :] < (self.pos - start)[:, None])

    def settle_(self) -> "MHLAState":
        """Folds the buffered tokens into R (``partial += sum_s k_s v_s^T``, slots in order) and
        marks R complete up to ``pos``: the form every path but the Triton decode kernel reads.
        The same stream either way. An R that holds no token of the current block is read as zero
        by the kernel, so it is zeroed here too (only a crafted state has one: the loader refuses
        it). No host sync on CUDA, so a captured forward may call it."""
        if not self.pos.is_cuda and self._settled_on_host():
            return self  # (the CPU decode calls this every token: a dozen small ops a layer spared)
        slots = self.buffered_slots()
        start, end = self._open_block()
        live = (end > start).to(torch.float32)[:, None, None, None]  # R holds tokens of block i
        self.partial.mul_(live)
        if slots.is_cuda or bool(slots.any()):  # (a host check on the CPU: its decode skips the einsum)
            mask = slots[:, None, :, None].to(torch.float32)  # [B, 1, C, 1]
            self.partial += torch.einsum("bhck,bhcv->bhkv", self.open_keys * mask, self.open_values)
        return self.mark_settled_()

    def _settled_on_host(self) -> bool:
        """True when every row's R already holds its block up to ``pos`` (both columns of
        ``partial_end`` equal to it: nothing buffered, R live or at a block start); host reads."""
        return all(e[0] == e[1] == p for p, e in zip(self.pos.tolist(), self.partial_end.tolist()))

    def settled(self) -> "MHLAState":
        """A settled copy with the open buffers zeroed: equal for two states of the same stream
        whichever form their open blocks took (tests compare states with it)."""
        out = self.clone().settle_()
        out.open_keys.zero_()
        out.open_values.zero_()
        return out

    def mark_settled_(self) -> "MHLAState":
        """After a path that kept the open block in R: R holds everything up to ``pos``."""
        self.partial_end.copy_(self.pos[:, None].expand(-1, 2))
        return self

    @staticmethod
    def advance_positions(states: list["MHLAState"], n: int = 1) -> None:
        """Every state's position += n, as one multi-tensor launch (the fused decode leaves
        positions to its caller, which moves all layers at once)."""
        torch._foreach_add_([s.pos for s in states], n)

    def check_compatible(self, batch_size: int, num_heads: int, key_dim: int, value_dim: int,
                         block_size: int, num_blocks: int) -> None:
        want = (batch_size, num_heads, key_dim, value_dim, block_size, num_blocks)
        have = (self.batch_size, self.num_heads, self.key_dim, self.value_dim, self.block_size, self.num_blocks)
        if want != have:
            names = ("batch", "heads", "key_dim", "value_dim", "block_size", "num_blocks")
            diff = ", ".join(f"{n}: state {h} vs input {w}" for n, h, w in zip(names, have, want) if h != w)
            raise ValueError(f"state does not match the inputs ({diff})")
