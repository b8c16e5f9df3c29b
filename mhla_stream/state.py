"""Per-layer streaming state of the MHLA operator (SPEC section 1, decode form).

Preallocated fp32 tensors with explicit positions, so a decode step only writes in place
(and can be captured in a CUDA graph). For a batch of ``B`` sequences and ``H`` heads:

    ring    [B, H, W, K, V]  summaries S_j of the last W = max(L-1, 1) completed blocks, slot j % W
    far     [B, H, K, V]     sum of the summaries evicted from the ring (policy window+far only)
    prefix  [B, H, K, V]     P_i, the mixed prefix of the current block i
    partial [B, H, K, V]     R, sum of k v^T over the tokens of block i seen so far
    pos     [B] int64        tokens seen by each sequence (its current block is pos // C)

The number of far blocks is derived from ``pos`` (``completed - W``), so it is not stored.
Memory is O(L * K * V) per head per sequence however long the stream runs.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .mixing import check_policy, has_far


@dataclass
class MHLAState:
    ring: torch.Tensor
    far: torch.Tensor
    prefix: torch.Tensor
    partial: torch.Tensor
    pos: torch.Tensor
    block_size: int
    num_blocks: int  # L, the trained blocks of the mixing matrix
    policy: str

    # the tensors that make up the state, in this order: what clone/copy_/nbytes and the state
    # files (``StreamingMHLA.save_state``) iterate over
    TENSORS = ("ring", "far", "prefix", "partial", "pos")

    @classmethod
    def empty(cls, batch_size: int, num_heads: int, key_dim: int, value_dim: int, *, block_size: int = 64,
              num_blocks: int, policy: str, device=None) -> "MHLAState":
        check_policy(policy)
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"block_size and num_blocks must be >= 1, got {block_size} and {num_blocks}")
        B, H, K, V = batch_size, num_heads, key_dim, value_dim
        W = max(num_blocks - 1, 1)
        z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)  # noqa: E731
        far = z(B, H, K, V) if has_far(policy) else z(B, H, 0, V)
        return cls(z(B, H, W, K, V), far, z(B, H, K, V), z(B, H, K, V),
                   torch.zeros(B, dtype=torch.int64, device=device), block_size, num_blocks, policy)

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
        return self._map(lambda t: t.to(device))

    def select(self, index) -> "MHLAState":
        """Views of some sequences (``index`` a slice); in-place updates write through."""
        return self._map(lambda t: t[index])

    def copy_(self, other: "MHLAState") -> "MHLAState":
        for n in self.TENSORS:
            getattr(self, n).copy_(getattr(other, n))
        return self

    def zero_(self) -> "MHLAState":
        for n in self.TENSORS:
            getattr(self, n).zero_()
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
