"""HSP-SAM's Q&A prompt pairs (Hierarchical Self-Prompting SAM, eq. 2).

One set per hierarchy level: c learnable Q prompts of the encoder's token width, which join the
encoder's attention (see ``SAMImageEncoder.forward(prompt_tokens=...)``), and their A prompts,
the mask decoder's sparse prompt tokens, ``a_i = mlp_i(f(q_i))``: a linear map ``f`` shared by
the c prompts of the level, then c independent MLPs, one per prompt. A is computed from the
learned Q parameters themselves, so the decoder's loss reaches Q through A.
"""
from __future__ import annotations

import torch
from torch import nn


class AnswerMLP(nn.Module):
    """Linear, GELU, linear: (..., dim) -> (..., dim), the per-prompt ``mlp_i``."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class QAPrompts(nn.Module):
    """c Q prompts (c, encoder_dim) and the map to their A prompts (c, decoder_dim)."""

    def __init__(self, *, num_prompts: int, encoder_dim: int, decoder_dim: int,
                 hidden_dim: int | None = None) -> None:
        super().__init__()
        if num_prompts < 1:
            raise ValueError(f"the number of Q&A prompt pairs must be >= 1, got {num_prompts}")
        self.queries = nn.Parameter(torch.empty(num_prompts, encoder_dim))
        nn.init.trunc_normal_(self.queries, std=0.02)  # ViT token scale; "randomly initialised"
        self.shared_map = nn.Linear(encoder_dim, decoder_dim)  # f
        self.answer_mlps = nn.ModuleList(AnswerMLP(dim=decoder_dim, hidden_dim=hidden_dim or decoder_dim)
                                         for _ in range(num_prompts))

    @property
    def num_prompts(self) -> int:
        return self.queries.shape[0]

    def answers(self) -> torch.Tensor:
        """A = (mlp_1(f(q_1)), ..., mlp_c(f(q_c))): (c, decoder_dim)."""
        mapped = self.shared_map(self.queries)
        return torch.stack([mlp(mapped[i]) for i, mlp in enumerate(self.answer_mlps)])
