"""Fixed-size self-attention cache of the two context chunks of sparse causal attention.

For every block and every slot (a denoising step index in `per-step` mode, a single slot in `clean-context`
mode) it holds keys and values of two chunks: `FIRST` (c_0, which carries the reference image) and `PREVIOUS`
(c_{t−1}). Keys are stored after the q/k RMSNorm and before RoPE, in head layout `[B, L, H, D]` (L = tokens
per chunk, frame-major on every topology; H = the heads this rank holds), so RoPE can be applied at use for
any window position and so a sequence-parallel rank keeps exactly its heads' slice of what one rank keeps.
The storage is allocated once: memory never grows with the number of chunks.
"""

from __future__ import annotations

import torch

FIRST = 0
PREVIOUS = 1

KV = tuple[torch.Tensor, torch.Tensor]


class ChunkKVCache:
    """Keys/values `[layers, slots, 2 roles, B, L, H, D]` for c_0 (role FIRST) and c_{t−1} (role PREVIOUS)."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        batch: int,
        tokens: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_slots, 2, batch, tokens, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache tensors (constant for the session's lifetime)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def store(self, slot: int, role: int, kvs: list[KV]) -> None:
        """Write one chunk's per-block (k, v) `[B, L, H, D]` into `slot`/`role`, in place."""
        if len(kvs) != self.num_layers:
            raise ValueError(f"got keys/values for {len(kvs)} blocks, the cache holds {self.num_layers}")
        for layer, (k, v) in enumerate(kvs):
            if k.shape != self.k.shape[3:]:
                raise ValueError(
                    f"block {layer} keys have shape {tuple(k.shape)}, "
                    f"the cache expects {tuple(self.k.shape[3:])}"
                )
            self.k[layer, slot, role].copy_(k)
            self.v[layer, slot, role].copy_(v)

    def prefix(self, slot: int, roles: tuple[int, ...]) -> list[KV]:
        """Per-block (k, v) `[B, len(roles)·L, H, D]`: the chunks of `roles` concatenated in that order."""
        if len(roles) == 1:
            return [(self.k[i, slot, roles[0]], self.v[i, slot, roles[0]]) for i in range(self.num_layers)]
        return [
            (
                torch.cat([self.k[i, slot, r] for r in roles], dim=1),
                torch.cat([self.v[i, slot, r] for r in roles], dim=1),
            )
            for i in range(self.num_layers)
        ]
