"""CLIP's text tower: token and learned position embeddings, causal transformer blocks (timm's, as the image
tower's, attending only to earlier tokens), a final norm, and the caption read at its end marker, as CLIP
reads it (the end marker has the largest id, so it is where the ids peak)."""
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from supmae.pipelines.text import CONTEXT

VOCABULARY_SIZE = 49408  # open_clip's CLIP tokenizer


class TextTower(nn.Module):
    def __init__(self, *, width: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 vocab_size: int = VOCABULARY_SIZE, context: int = CONTEXT):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)

    def init_embeddings(self) -> None:
        """CLIP's: the token and position embeddings normal with std 0.02 and 0.01."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, W) features of every position."""
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]
        for blk in self.blocks:
            x = blk(x, is_causal=True)
        return self.ln_final(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, W): each caption's feature at its end marker."""
        x = self.tokens(ids)
        return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
