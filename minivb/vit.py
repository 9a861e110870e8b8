"""The vision encoder: EVA-CLIP ViT-g/14, turning each video frame into 257 feature vectors.

Where it sits: a video (B, T, 3, 224, 224) is flattened to N = B*T frames; this ViT encodes every frame on its own
into (N, 257, 1408) frame features: one class token and 16 x 16 = 256 patch tokens. The Q-Former (qformer.py)
then reads all 257 of them through cross-attention. Nothing here knows about video: frames are just images.

The architecture is the plain Vision Transformer (Dosovitskiy et al., 2020) as EVA-CLIP trained it:
  1. cut the image into 14 x 14 patches and project each to C channels (a strided convolution);
  2. prepend a learned class token and add learned position embeddings (one per position, 1 + P of them);
  3. run pre-LayerNorm blocks: x = x + attention(norm(x)); x = x + mlp(norm(x));
  4. a final LayerNorm over all tokens.

It mirrors transformers' InstructBlipVideoVisionModel (models/instructblipvideo/modeling_instructblipvideo.py,
itself BLIP-2's vision model): same arithmetic, so the official weights load one to one (see checkpoint.py).

Shapes: N images (B videos x T frames), H x W pixels, p patch size (14), P patches ((H/p) * (W/p): 256 at 224 px),
C channels (1408), h heads (16), d = C/h head size (88), F MLP size (6144).
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import fast
from .config import VisionConfig


class VisionAttention(nn.Module):
    """Multi-head self-attention over the 1 + P tokens of one image, with q, k and v from one fused projection."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"vision hidden_size {config.hidden_size} must be divisible by "
                f"num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        # The official bias is stored fused as [q_bias, 0, v_bias]: EVA-CLIP learns no key bias (it would shift all
        # scores of a row equally, which softmax ignores), but the zeros are in the checkpoint, so we load it whole.
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, return_attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_images, num_tokens, channels = hidden.shape  # (N, 1+P, C)
        qkv = self.qkv(hidden).reshape(num_images, num_tokens, 3, self.num_heads, self.head_dim)  # (N, 1+P, 3, h, d)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, h, 1+P, d)
        if return_attention:
            # The explicit softmax, so the weights can be returned (the notebooks draw them).
            scores = query @ key.transpose(-2, -1) * self.head_dim**-0.5  # (N, h, 1+P, 1+P)
            weights = scores.softmax(dim=-1)
            attended = weights @ value  # (N, h, 1+P, d)
        else:
            weights = None
            attended = F.scaled_dot_product_attention(query, key, value)  # (N, h, 1+P, d), same scale d**-0.5
        attended = attended.transpose(1, 2).reshape(num_images, num_tokens, channels)  # (N, 1+P, C)
        return self.proj(attended), weights


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(
                f"vision hidden_act {config.hidden_act!r} is not supported; the official checkpoints use 'gelu'"
            )
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU, as EVA-CLIP was trained: the tanh approximation drifts over 39 layers.
        return self.fc2(F.gelu(self.fc1(hidden)))  # (N, 1+P, F) inside, (N, 1+P, C) out


class VisionBlock(nn.Module):
    """A pre-LayerNorm transformer block: each sublayer reads a normalized copy and adds to the residual stream."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, hidden: torch.Tensor, return_attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.attn_norm(hidden), return_attention)
        hidden = hidden + attended
        hidden = hidden + self.mlp(self.mlp_norm(hidden))
        return hidden, weights


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.grid_size = config.image_size // config.patch_size  # 16 patches a side at 224 px
        channels = config.hidden_size
        self.patch_embedding = nn.Conv2d(3, channels, kernel_size=config.patch_size, stride=config.patch_size)
        # Filled from the checkpoint; zeros until then.
        self.class_token = nn.Parameter(torch.zeros(1, 1, channels))
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, channels))
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.num_hidden_layers))
        # The official eps is 1e-6 (config.layer_norm_eps). Early ports used 1e-5, a known bug that makes the
        # 39-layer outputs drift away from the original model.
        self.post_norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)

    def position_embeddings(self, height: int, width: int) -> torch.Tensor:
        """The learned positions for an H x W image: as trained at image_size, else resized bicubically.

        Done exactly as transformers' InstructBlipVideoVisionEmbeddings.interpolate_pos_encoding (after DINO):
        the class position is kept, the g x g grid of patch positions is resized to (H/p) x (W/p) with
        bicubic interpolation, align_corners=False.
        """
        grid_height, grid_width = height // self.patch_size, width // self.patch_size
        if (grid_height, grid_width) == (self.grid_size, self.grid_size):
            return self.position_embedding  # (1, 1+P, C); resizing to the same grid would be the identity
        channels = self.position_embedding.shape[-1]
        class_position = self.position_embedding[:, :1]  # (1, 1, C)
        patch_positions = self.position_embedding[:, 1:].reshape(1, self.grid_size, self.grid_size, channels)
        patch_positions = patch_positions.permute(0, 3, 1, 2)  # (1, C, g, g): interpolate wants channels first
        patch_positions = F.interpolate(
            patch_positions, size=(grid_height, grid_width), mode="bicubic", align_corners=False
        )  # (1, C, H/p, W/p)
        patch_positions = patch_positions.permute(0, 2, 3, 1)  # (1, H/p, W/p, C)
        patch_positions = patch_positions.reshape(1, grid_height * grid_width, channels)  # (1, P, C), row-major
        return torch.cat([class_position, patch_positions], dim=1)  # (1, 1+P, C)

    def _check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be 4-D (images, 3, height, width), got shape {tuple(pixel_values.shape)}; "
                "flatten videos (B, T, 3, H, W) to (B*T, 3, H, W) first"
            )
        if pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have 3 color channels in dim 1, got shape {tuple(pixel_values.shape)}")
        height, width = pixel_values.shape[-2:]
        size = self.config.image_size
        if not interpolate_pos_encoding and (height, width) != (size, size):
            raise ValueError(
                f"pixel_values are {height}x{width} pixels but the vision encoder expects {size}x{size}; "
                "resize the frames or pass interpolate_pos_encoding=True"
            )
        if height < self.patch_size or width < self.patch_size:
            raise ValueError(
                f"pixel_values are {height}x{width} pixels, smaller than one {self.patch_size}x{self.patch_size} patch"
            )

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, return_attentions: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode N images (N, 3, H, W) into features (N, 1+P, C).

        With return_attentions=True, also return one attention map (N, h, 1+P, 1+P) per block.
        """
        self._check_pixel_values(pixel_values, interpolate_pos_encoding)
        num_images, _, height, width = pixel_values.shape
        # The compute dtype: the weights' own, except bf16 weights on a CPU without native bf16, which compute in
        # fp32 (fast.py). Frames usually arrive in float32 while the weights may be half precision.
        weight_dtype = self.patch_embedding.weight.dtype
        with fast.phase("vision", self.patch_embedding.weight) as compute:
            patches = self.patch_embedding(pixel_values.to(compute))  # (N, C, H/p, W/p)
            patches = patches.flatten(2).transpose(1, 2)  # (N, P, C), patches in row-major order
            class_tokens = self.class_token.expand(num_images, -1, -1).to(compute)  # (N, 1, C)
            hidden = torch.cat([class_tokens, patches], dim=1)  # (N, 1+P, C)
            hidden = hidden + self.position_embeddings(height, width)  # (N, 1+P, C)

            attentions = []
            for block in self.blocks:
                hidden, weights = block(hidden, return_attentions)
                attentions.append(weights)
            # The final LayerNorm covers all 1+P tokens, not only the class token: the Q-Former reads them all.
            features = self.post_norm(hidden).to(weight_dtype)  # (N, 1+P, C)
        return (features, attentions) if return_attentions else features
