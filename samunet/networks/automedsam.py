"""AutoMedSAM (diffusion-empowered auto-prompt MedSAM): class-index prompted SAM.

- Frozen image encoder (LiteMedSAM by default; MedSAM ViT-B with ``--backbone vit_b --weights medsam_vit_b``),
  as in the paper; ``lora_rank`` > 0 adds SAMed's rank-r LoRA on q and v of every attention layer
  (samunet's ``AutoMedSAMTrainer_lora`` variant, not the paper's).
- ``class_prompt_encoder``: :class:`samunet.modules.diffusion_prompt_encoder.DiffusionClassPromptEncoder`
  turns (image embedding, class k) into SAM's sparse and dense prompt embeddings.
- The dense branch predicts a residual on the frozen prompt encoder's learned 'no mask' embedding
  (the teacher's dense output for a box prompt); both branches start at zero, so training starts from
  SAM's prompt-free decoding.
- SAM's mask decoder (trainable) reads its first mask token (SAM's single-mask output): the
  binary mask logit of class k.
- ``prompt_encoder``: the released (Lite)MedSAM prompt encoder, frozen. It supplies the image
  positional encoding and is the teacher of the knowledge-transfer MSE (:meth:`teacher_prompts`).
- ``uncertainty``: the loss's learnable s_i, kept here so checkpoints, ``--c`` and fold loading carry
  them; inference never uses them.

``forward(x, class_labels=k)`` is the training path (one or several prompted classes per image, each
image encoded once, returning a :class:`ClassPrediction`); trainers call it through the (possibly DDP-wrapped or compiled) network.
``forward(x)`` runs every foreground class (or the ones set with :meth:`set_predict_classes`) and
returns K-channel log-probabilities for nnU-Net:
p_k = sigmoid(logit_k) for k >= 1 (0 for unselected classes), p_0 = 1 - max_k p_k, normalised to
sum 1. Argmax therefore gives class k where p_k > 0.5 and is the largest; overlaps go to the most
probable class.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from samunet.backbones.catalog import get_backbone_spec
from samunet.errors import ConfigurationError
from samunet.modules.decoders import decode_masks, freeze_iou_head
from samunet.modules.diffusion_prompt_encoder import DiffusionClassPromptEncoder
from samunet.modules.lora import add_qv_lora
from samunet.modules.uncertainty_loss import LOSS_TERMS, UncertaintyWeighting
from samunet.networks.base import SAMNetworkConfig, SAMSegmentationNetwork


class ClassPrediction(NamedTuple):
    """mask_logits: (B, 1, S, S); sparse: (B, n, C); dense: (B, C, h, w)."""

    mask_logits: torch.Tensor
    sparse: torch.Tensor
    dense: torch.Tensor


def parse_class_selection(selection: str, labels: dict[str, int | list[int]]) -> list[int]:
    """'liver,spleen' or '1,3' (names from dataset.json's ``labels`` or label values) -> sorted label values.

    Background and unknown names raise ConfigurationError.
    """
    foreground = {name: value for name, value in labels.items() if isinstance(value, int) and value > 0}
    chosen = set()
    for item in (part.strip() for part in selection.split(",") if part.strip()):
        if item in foreground:
            chosen.add(foreground[item])
        elif item.isdigit() and int(item) in foreground.values():
            chosen.add(int(item))
        else:
            raise ConfigurationError(f"unknown class {item!r}; choose from {sorted(foreground)} or "
                                     f"{sorted(foreground.values())}")
    if not chosen:
        raise ConfigurationError("no class selected")
    return sorted(chosen)


class AutoMedSAMNetwork(SAMSegmentationNetwork):
    """Train: ``forward(x, class_labels=k)`` (B, C, S, S), k (B,) or (B, m) -> :class:`ClassPrediction`. Eval:
    ``forward(x)`` (B, C, S, S) -> log-probabilities (B, K, S, S)."""

    def __init__(self, config: SAMNetworkConfig, *, num_sparse_tokens: int = 2, num_timesteps: int = 1000,
                 max_noise_scale: float = 1.0, lora_rank: int = 0) -> None:
        if config.num_classes < 2:
            raise ConfigurationError("AutoMedSAM needs at least one foreground class")
        super().__init__(config)
        self.class_prompt_encoder = DiffusionClassPromptEncoder(
            num_classes=config.num_classes - 1, embed_dim=get_backbone_spec(config.backbone).prompt_dim,
            embedding_size=self.prompt_encoder.image_embedding_size, num_sparse_tokens=num_sparse_tokens,
            num_timesteps=num_timesteps, max_noise_scale=max_noise_scale)
        self.uncertainty = UncertaintyWeighting(num_terms=len(LOSS_TERMS))
        # (1, 4) box around the whole S x S input; a buffer, so it lives on the network's device and no
        # forward copies it from the host (not persistent: checkpoints stay as they were)
        self.register_buffer("whole_image_box", torch.tensor([[0.0, 0.0, self.img_size - 1.0, self.img_size - 1.0]]),
                             persistent=False)
        self.predict_classes: list[int] | None = None
        if lora_rank < 0:
            raise ConfigurationError(f"lora_rank must be >= 0 (0: the paper's frozen encoder), got {lora_rank}")
        self.lora = add_qv_lora(self.image_encoder.qkv_projections(), rank=lora_rank) if lora_rank else None
        self.set_trainable()

    def set_trainable(self) -> None:
        """The class-prompt encoder, the mask decoder, the loss's s_i and, with ``lora_rank`` > 0, the encoder's
        LoRA train; of the decoder's released mask tokens only the first (SAM's single-mask output) is read, so
        the other tokens' hypernetwork MLPs, like the IoU head, would never receive a gradient and stay frozen
        (the tokens themselves still shape the first through the decoder's attention and train)."""
        self.train_only(self.class_prompt_encoder, self.mask_decoder, self.uncertainty, self.lora)
        freeze_iou_head(self.mask_decoder)
        for mlp in self.mask_decoder.output_hypernetworks_mlps[1:]:
            mlp.requires_grad_(False)

    def set_predict_classes(self, classes: Sequence[int] | None) -> None:
        """Label values that ``forward`` predicts (None: all); the others get probability 0."""
        if classes is not None:
            invalid = [k for k in classes if not 1 <= int(k) < self.num_classes]
            if invalid:
                raise ConfigurationError(f"classes {invalid} are not foreground labels 1..{self.num_classes - 1}")
            classes = sorted({int(k) for k in classes})
        self.predict_classes = classes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, S, S) -> image embedding (B, C, h, w)."""
        return self.image_encoder(self.input_stage(x)).embedding

    def decode_class(self, embedding: torch.Tensor, class_labels: torch.Tensor,
                     output_size: tuple[int, int]) -> ClassPrediction:
        """Image embedding (B, C, h, w) and label values k (B,) in 1..K-1 -> the class's mask and prompts."""
        sparse_residual, dense_residual = self.class_prompt_encoder(embedding, class_labels - 1)
        base_sparse, base_dense = self.whole_image_prompts()
        sparse, dense = base_sparse + sparse_residual, base_dense + dense_residual
        decoded = decode_masks(self.mask_decoder, embedding, self.prompt_encoder.get_dense_pe(), sparse, dense)
        logits = decoded.masks[:, :1]
        if logits.shape[-2:] != tuple(output_size):
            logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
        return ClassPrediction(mask_logits=logits, sparse=sparse, dense=dense)

    @torch.no_grad()
    def whole_image_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen prompt encoder's prompts for a box around the whole image: sparse (1, 2, C), dense
        (1, C, h, w). The class-prompt encoder's outputs are residuals on these."""
        return self.teacher_prompts(self.whole_image_box)

    @torch.no_grad()
    def teacher_prompts(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen original prompt encoder on boxes (B, 4) (x0, y0, x1, y1 in input pixels of the
        encoder's S x S image) -> sparse (B, 2, C), dense (B, C, h, w)."""
        return self.prompt_encoder(points=None, boxes=boxes[:, None], masks=None)

    def forward(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor | ClassPrediction:
        """x: (B, C_in, S, S). With label values ``class_labels`` (B,) or (B, m) in 1..K-1: the binary mask
        logits of those classes and their prompts, (B * m) rows image-major, each image encoded once
        (training). Without: log-probabilities (B, K, S, S) of every selected class, merged as the module
        docstring says."""
        embedding = self.encode(x)
        if class_labels is not None:
            if class_labels.ndim == 2:  # several classes per image: one encoding, decoded once per class
                embedding = embedding.repeat_interleave(class_labels.shape[1], dim=0)
            return self.decode_class(embedding, class_labels.reshape(-1), x.shape[-2:])
        classes = self.predict_classes or list(range(1, self.num_classes))
        probabilities = x.new_zeros(x.shape[0], self.num_classes, *x.shape[-2:], dtype=torch.float32)
        for label in classes:
            labels = torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)
            logits = self.decode_class(embedding, labels, x.shape[-2:]).mask_logits
            probabilities[:, label] = torch.sigmoid(logits[:, 0].float())
        return class_log_probabilities(probabilities)


def class_log_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) with per-class foreground probabilities in channels 1..K-1 -> log-probabilities:
    background 1 - max_k p_k, then every channel divided by the sum."""
    background = 1 - probabilities[:, 1:].max(dim=1).values
    stacked = torch.cat([background[:, None], probabilities[:, 1:]], dim=1)
    return (stacked / stacked.sum(dim=1, keepdim=True).clamp_min(1e-12)).clamp_min(1e-12).log()
