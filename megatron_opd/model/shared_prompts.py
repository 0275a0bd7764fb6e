"""Shared-prompt packing: the n rollouts of one prompt in one row, the prompt computed once.

Why it exists: a step trains on ``n_samples_per_prompt`` rollouts of every prompt, so a right-padded [B, S] batch
runs each prompt's tokens n times through every linear layer, norm and activation, of the student forward, its
backward and the teacher's forward, only to get the same values n times. Packed, row g holds the prompt once and
then its n responses one after the other, [G, L] with G = B / n; the token-wise work (everything but attention)
shrinks by (n - 1) / n of the prompt's share of the tokens (about 20% on the CPU main job: 18 prompt tokens
before 4 responses of ~51). The loss and its gradient are those of the unpacked batch up to fp32 rounding.

Two things make a packed row behave like its n sequences:

- **Positions.** Response tokens keep their own sequence's positions (the prompt's length, then 1, 2, ...):
  ``rope_positions`` makes Megatron's rotary embedding return per-token angles [L, G, 1, d] instead of the
  [L, 1, 1, d] of 0..L-1, which its ``apply_rotary_pos_emb`` broadcasts the same way.
- **Attention.** A response must see the prompt and itself, not the responses packed before it. The layout is
  passed down as the model's ``attention_mask``; the core attention (``model.attention.SDPAttention``) gathers
  query, key and value into the unpacked [B, S] layout (prompt rows repeated), runs its usual causal attention,
  and gathers each packed token's output back (a prompt token from its first sequence). The gathers' backward
  sums the repeated prompt keys' and values' gradients, as n separate sequences would. Attention itself costs
  what it costs unpacked; only its inputs and outputs move.

Only the SDPA core attention reads the layout (Transformer-Engine's attention would take it for a mask: the step
refuses that combination). Rows of one group must have identical prompts, found by comparing tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class SharedPromptLayout:
    """Where each token of the unpacked [B, S] batch lives in the packed [G, L] one, and back.

    Attributes:
        unpack: [B * S] int64: flat packed index (g * L + l) of unpacked token (b, t), row-major; tokens past a
            sequence's end point at a valid packed token (causal attention keeps them out of real positions).
        pack: [G * L] int64: flat unpacked index (b * S + t) whose output a packed token takes.
        positions: [G, L] int64: each packed token's position in its own sequence (RoPE angles).
        batch, seq_len: B, S.
    """

    unpack: torch.Tensor
    pack: torch.Tensor
    positions: torch.Tensor
    batch: int
    seq_len: int

    def to(self, device: torch.device) -> SharedPromptLayout:
        """The layout with its index tensors on ``device``."""
        return dataclasses.replace(
            self,
            unpack=self.unpack.to(device),
            pack=self.pack.to(device),
            positions=self.positions.to(device),
        )

    def to_unpacked(self, x: torch.Tensor) -> torch.Tensor:
        """Megatron's [L, G, heads, d] -> [B, heads, S, d] for attention."""
        L, G = x.shape[0], x.shape[1]
        flat = x.transpose(0, 1).reshape(G * L, *x.shape[2:])
        return flat.index_select(0, self.unpack).view(self.batch, self.seq_len, *x.shape[2:]).transpose(1, 2)

    def to_packed(self, out: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        """Attention output [B, heads, S, d] -> Megatron's [L, G, heads * d]."""
        B, H, S, D = out.shape
        flat = out.transpose(1, 2).reshape(B * S, H * D)
        return flat.index_select(0, self.pack).view(rows, length, H * D).transpose(0, 1)


@dataclass
class PackedPrompts:
    """A batch packed by ``pack_shared_prompts``.

    Attributes:
        tokens: [G, L] int64 packed rows (0 after each row's end).
        layout: the ``SharedPromptLayout`` for the core attention and RoPE.
        row: [B] int64: packed row of each sequence.
        offset: [B] int64: packed column of each sequence's first response token minus its prompt length, so
            that unpacked position t >= P_b of sequence b is packed column t + offset[b] (offset 0 for the first
            sequence of a row).
        prompt_lengths: [B] int64.
    """

    tokens: torch.Tensor
    layout: SharedPromptLayout
    row: torch.Tensor
    offset: torch.Tensor
    prompt_lengths: torch.Tensor

    def locate(self, seq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed (row, column) [N] of unpacked (sequence, position) [N]: a prompt position is the shared copy."""
        in_prompt = pos < self.prompt_lengths[seq]
        col = torch.where(in_prompt, pos, pos + self.offset[seq])
        return self.row[seq], col


def prompt_groups(tokens: torch.Tensor, prompt_lengths: torch.Tensor) -> list[list[int]]:
    """Sequences with identical prompts, in order of first appearance. tokens [B, S], prompt_lengths [B]."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, p in enumerate(prompt_lengths.tolist()):
        groups.setdefault(tuple(tokens[b, :p].tolist()), []).append(b)
    return list(groups.values())


def pack_shared_prompts(
    tokens: torch.Tensor, prompt_lengths: torch.Tensor, lengths: torch.Tensor, *, multiple: int = 1
) -> PackedPrompts | None:
    """Pack a right-padded batch: one row per distinct prompt, the prompt once, then its sequences' responses.

    tokens [B, S] (sequence b's real tokens are ``tokens[b, :lengths[b]]``, its prompt the first
    ``prompt_lengths[b]``); the packed length L is padded to ``multiple``. Returns None when no prompt repeats
    (nothing to share: the caller keeps the unpacked batch).
    """
    B, S = tokens.shape
    groups = prompt_groups(tokens, prompt_lengths)
    if len(groups) == B:
        return None
    P, N = prompt_lengths.tolist(), lengths.tolist()
    row, offset = [0] * B, [0] * B
    widths = []
    for g, members in enumerate(groups):
        col = P[members[0]]
        for b in members:
            row[b], offset[b] = g, col - P[b]
            col += N[b] - P[b]
        widths.append(col)
    L = -(-max(widths) // multiple) * multiple
    packed = torch.zeros(len(groups), L, dtype=tokens.dtype)
    positions = torch.zeros(len(groups), L, dtype=torch.long)
    pack = torch.zeros(len(groups), L, dtype=torch.long)
    for g, members in enumerate(groups):
        first = members[0]
        packed[g, : P[first]] = tokens[first, : P[first]]
        positions[g, : P[first]] = torch.arange(P[first])
        pack[g, : P[first]] = first * S + torch.arange(P[first])
        for b in members:
            start, stop = P[b] + offset[b], N[b] + offset[b]
            packed[g, start:stop] = tokens[b, P[b] : N[b]]
            positions[g, start:stop] = torch.arange(P[b], N[b])
            pack[g, start:stop] = b * S + torch.arange(P[b], N[b])
        pack[g, widths[g] :] = first * S  # padding: any valid output
    t = torch.arange(S).unsqueeze(0)
    row_t, off_t = torch.tensor(row), torch.tensor(offset)
    P_t = prompt_lengths.cpu()
    col = torch.where(t < P_t.unsqueeze(1), t, t + off_t.unsqueeze(1))
    # Past a sequence's end: keep the index in its row (any finite value; causal attention never reads it).
    col = torch.minimum(col, torch.full_like(col, L - 1))
    unpack = (row_t.unsqueeze(1) * L + col).reshape(-1)
    layout = SharedPromptLayout(unpack=unpack, pack=pack.reshape(-1), positions=positions, batch=B, seq_len=S)
    return PackedPrompts(tokens=packed, layout=layout, row=row_t, offset=off_t, prompt_lengths=P_t)


class _PerTokenRotary(torch.nn.Module):
    """Stands in for a ``GPTModel``'s ``rotary_pos_emb`` during one forward: the angles at given positions."""

    def __init__(self, inner: torch.nn.Module, positions: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.positions = positions  # [G, L]

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return int(self.positions.max()) + 1

    def forward(self, seq_len: int, *args, **kwargs) -> torch.Tensor:
        emb = self.inner(seq_len, *args, **kwargs)  # [max_pos + 1, 1, 1, d]
        return emb[:, 0, 0][self.positions.t()].unsqueeze(2)  # [L, G, 1, d]


@contextlib.contextmanager
def rope_positions(core: torch.nn.Module, positions: torch.Tensor | None) -> Iterator[None]:
    """During a forward of ``core`` (a ``GPTModel``), RoPE at per-token ``positions`` [G, L] (None: unchanged)."""
    inner = getattr(core, "rotary_pos_emb", None)
    if positions is None or inner is None:
        yield
        return
    core.rotary_pos_emb = _PerTokenRotary(inner, positions)
    try:
        yield
    finally:
        core.rotary_pos_emb = inner


def model_forward(
    model: torch.nn.Module,
    core: torch.nn.Module,
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    shared: SharedPromptLayout | None,
) -> torch.Tensor:
    """``model(tokens, position_ids, mask)`` for plain [b, L] rows (``shared`` None) or packed ones: the layout
    goes down as the attention mask and RoPE takes each token's own position. ``core`` is ``model``'s
    ``GPTModel``."""
    with rope_positions(core, None if shared is None else shared.positions):
        return model(tokens, position_ids, shared)


def check_shared_prompts(chunks: list[torch.nn.Module], who: str) -> None:
    """Raise unless every attention of ``chunks`` reads the layout (the SDPA core attention) and RoPE is unfused
    (the fused kernels take one angle per position, not per token)."""
    from megatron_opd.model.attention import SDPAttention

    for chunk in chunks:
        for name, module in chunk.named_modules():
            if name.endswith("core_attention") and not isinstance(module, SDPAttention):
                raise ValueError(
                    f"train.share_prompts needs the SDPA core attention, but {who}'s {name} is "
                    f"{type(module).__name__} (Transformer-Engine's layer spec); set train.share_prompts false"
                )
            config = getattr(module, "config", None)
            if getattr(config, "apply_rope_fusion", False):
                raise ValueError(
                    f"train.share_prompts needs unfused RoPE (per-token angles), but {who} sets "
                    "apply_rope_fusion; set train.share_prompts false"
                )
