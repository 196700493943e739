"""AutoMedSAMTrainer: AutoMedSAM (class-index prompted MedSAM) through nnU-Net's training loop.

Network: ``samunet.networks.automedsam.AutoMedSAMNetwork``. What the trainer adds (see
docs/methods/automedsam.md):

- Class sampling: every training image is prompted with ``classes_per_image`` (default 3) classes,
  decoded from its one encoding, drawn without replacement: each draw takes, with probability 0.8, a
  foreground class present in the patch and not yet drawn for that image (uniformly), otherwise one absent
  from it and not yet drawn, whose target is an empty mask (when one group is used up the other is taken;
  when both are, the image's draws start over). The paper does not say how many classes a training image
  is prompted with; one per image (``AutoMedSAMTrainer_one_class``) left two of the demo phantom's three
  organs unlearned within SAMed's time budget (docs/demo.md). Three per image give each encoding three
  supervised decodings; the class-prompt encoder and the mask decoder run once per class, so at LiteMedSAM
  256 px (batch 6, the network's forward and backward, measured alone on 2026-11-30) three classes cost
  1.9x one, four 2.6x (an earlier 1.15x was measured beside other jobs). Drawn independently (samunet
  until 2026-11-30), a small organ was often drawn twice or not at all, and the demo's spleen stayed short
  of SAMed's at its time budget.
- Targets for class k: the binary mask, its signed distance map, and its bounding box
  (x_min, y_min, x_max, y_max in the encoder's input pixels) for the frozen original prompt
  encoder, the knowledge-transfer teacher. Absent classes have no box: their MSE term is skipped.
- Loss: :class:`samunet.modules.uncertainty_loss.AutoMedSAMJointLoss` (MSE, CE, Dice, shape
  distance, uncertainty-weighted); the s_i are written to the log and to nnU-Net's logger
  (key ``uncertainty_s``) at every epoch end.
- Validation runs the network's all-class ``forward``; the validation loss is nnU-Net's Dice + CE
  on that merged output, so nnU-Net's validation, pseudo Dice and final validation run unchanged.
- Schedule: AdamW (0.9, 0.999) with poly LR (samunet's default); ``AutoMedSAMTrainer_plateau`` is the
  paper's AdamW + ReduceLROnPlateau(factor 0.9, patience 5, no cooldown) on the validation loss, one lr
  for every module. The default trains the class-prompt encoder, which starts from zero outputs, at
  ``class_prompt_lr_factor`` (10) times the lr of the mask decoder: with one lr the decoder learns to
  answer every small class with an empty mask before the class prompts tell the classes apart (the demo
  phantom's kidney and spleen, docs/methods/automedsam.md). The s_i train at the decoder's lr, without
  weight decay.
"""
from __future__ import annotations

import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch.optim.lr_scheduler import ReduceLROnPlateau

from samunet.errors import ConfigurationError
from samunet.modules.mask_geometry import label_presence, mask_boxes
from samunet.modules.uncertainty_loss import LOSS_TERMS, AutoMedSAMJointLoss, signed_distance_maps
from samunet.registry import TRAINERS
from samunet.trainers.base import SAMTrainerBase

PRESENT_CLASS_PROBABILITY = 0.8
CLASSES_PER_IMAGE = 3
CLASS_PROMPT_LR_FACTOR = 10.0
# AutoMedSAMTrainer_lora: the encoder's LoRA at 10 x the decoder's 1e-4, i.e. SAMedTrainer's LoRA lr (1e-3)
LORA_LR_FACTOR = 10.0
UNCERTAINTY_LOG_KEY = "uncertainty_s"


def sample_prompt_classes(target: torch.Tensor, *, num_classes: int, per_image: int = 1,
                          present_probability: float = PRESENT_CLASS_PROBABILITY,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Label maps (B, H, W) -> (label values (B, m) in 1..K-1, present (B, m) bool) for m = ``per_image``
    draws per map, drawn on the target's device without replacement.

    Draw r of a map takes, with probability ``present_probability``, a foreground class present in the map
    and not yet drawn for it, else one absent from it and not yet drawn, uniformly within the chosen group:
    the class with the largest uniform random key among the group's classes. When one group is used up
    the other is taken (a map without foreground always gets absent classes, one holding every class
    present ones); when both are (m > K - 1), the map's draws start over. The draws come from
    ``generator`` (on the target's device; torch's default generator of that device when None), so a
    seeded generator gives the same classes again; no value is read back by the host.
    """
    batch = target.shape[0]
    labels = target.reshape(batch, -1).long()
    labels = torch.where((labels >= 0) & (labels < num_classes), labels, torch.zeros_like(labels))  # others: no class
    here = label_presence(labels, num_classes)[:, 1:]
    absent = ~here
    class_index = torch.arange(num_classes - 1, device=target.device)
    taken = torch.zeros_like(here)
    drawn, drawn_present = [], []
    for _ in range(per_image):
        taken = taken & (~taken).any(dim=1, keepdim=True)  # every class drawn: start over
        here_left, absent_left = here & ~taken, absent & ~taken
        draw = torch.rand(batch, generator=generator, device=target.device)
        pick_present = here_left.any(dim=1) & ((draw < present_probability) | ~absent_left.any(dim=1))
        pool = torch.where(pick_present[:, None], here_left, absent_left)
        keys = torch.rand(batch, num_classes - 1, generator=generator, device=target.device)
        choice = torch.where(pool, keys, torch.full_like(keys, -1.0)).argmax(dim=1)
        taken = taken | (class_index == choice[:, None])
        drawn.append(choice + 1)
        drawn_present.append(pick_present)
    return torch.stack(drawn, dim=1), torch.stack(drawn_present, dim=1)


class GroupPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's poly schedule, lr_e = lr_0 (1 - e / E)^0.9, with each parameter group at its own multiple of
    it: the group's ``lr_factor`` (1 when absent). nnU-Net's scheduler gives every group the same lr."""

    def step(self, current_step: int | None = None) -> None:
        super().step(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] *= group.get("lr_factor", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


class ValidationPlateauScheduler:
    """ReduceLROnPlateau on the validation loss. nnU-Net calls ``step(epoch)`` at every epoch start;
    here the lr changes only in :meth:`report`, once per epoch, with that epoch's validation loss."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, factor: float = 0.9, patience: int = 5,
                 cooldown: int = 0) -> None:
        self.plateau = ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience, cooldown=cooldown)

    def step(self, epoch: int | None = None) -> None:
        """nnU-Net's per-epoch hook: the plateau rule needs the validation loss, so nothing changes here."""

    def report(self, validation_loss: float) -> None:
        self.plateau.step(validation_loss)


@TRAINERS.register()
class AutoMedSAMTrainer(SAMTrainerBase):
    network_class = "samunet.networks.automedsam.AutoMedSAMNetwork"
    optimizer_name = "adamw"
    default_hyperparameters = {"initial_lr": 1e-4, "weight_decay": 0.01, "num_epochs": 100}
    present_class_probability = PRESENT_CLASS_PROBABILITY
    classes_per_image = CLASSES_PER_IMAGE
    class_prompt_lr_factor = CLASS_PROMPT_LR_FACTOR
    lora_lr_factor = LORA_LR_FACTOR

    def initialize(self):
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise ConfigurationError("AutoMedSAM prompts one class label at a time; region or ignore labels "
                                     "are not supported")
        super().initialize()
        self.joint_loss = AutoMedSAMJointLoss(weighting=self.network_module.uncertainty,
                                              num_labels=self.network_module.num_classes)
        self.add_log_key(UNCERTAINTY_LOG_KEY)

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: the mask decoder (and any other trainable part) at the initial lr with weight decay; the
        class-prompt encoder at ``class_prompt_lr_factor`` times that lr (``lr_factor``, which the schedules keep)
        with weight decay; the loss's log-variances at the initial lr without decay (decay would pull every s_i
        towards 1); with an encoder LoRA (``AutoMedSAMTrainer_lora``), the LoRA at ``lora_lr_factor`` times the
        lr with weight decay. The first group's lr is the one nnU-Net logs."""
        module = self.network_module
        uncertainty = set(module.uncertainty.parameters())
        class_prompts = set(module.class_prompt_encoder.parameters())
        lora = set(module.lora.parameters()) if module.lora is not None else set()
        trainable = list(module.trainable_parameters())
        factor = float(self.class_prompt_lr_factor)
        groups = [{"params": [p for p in trainable if p not in uncertainty | class_prompts | lora],
                   "weight_decay": self.weight_decay, "lr": self.initial_lr, "lr_factor": 1.0},
                  {"params": [p for p in trainable if p in class_prompts], "weight_decay": self.weight_decay,
                   "lr": self.initial_lr * factor, "lr_factor": factor},
                  {"params": [p for p in trainable if p in uncertainty], "weight_decay": 0.0,
                   "lr": self.initial_lr, "lr_factor": 1.0}]
        if lora:
            groups.append({"params": [p for p in trainable if p in lora], "weight_decay": self.weight_decay,
                           "lr": self.initial_lr * self.lora_lr_factor, "lr_factor": float(self.lora_lr_factor)})
        return groups

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.initial_lr, betas=(0.9, 0.999), eps=1e-8)
        return optimizer, GroupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def _build_loss(self):
        """Validation loss on the merged all-class output (training uses ``joint_loss``)."""
        return DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "do_bg": False,
                               "ddp": self.is_ddp}, {}, weight_ce=1, weight_dice=1,
                              dice_class=MemoryEfficientSoftDiceLoss)

    def class_targets(self, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label maps (B, 1, H, W) -> for m = ``classes_per_image`` draws per image (without replacement,
        :func:`sample_prompt_classes`), image-major: sampled labels (B * m,), present (B * m,), mask
        (B * m, 1, H, W), distance maps (B * m, 1, H, W) and boxes (B * m, 4) in the encoder's input pixels."""
        module = self.network_module
        labels, present = sample_prompt_classes(target[:, 0], num_classes=module.num_classes,
                                                per_image=self.classes_per_image,
                                                present_probability=self.present_class_probability)
        labels, present = labels.reshape(-1), present.reshape(-1)
        target = target.repeat_interleave(self.classes_per_image, dim=0)
        mask = (target == labels.view(-1, 1, 1, 1)).float()
        x_scale, y_scale = module.img_size / target.shape[-1], module.img_size / target.shape[-2]
        boxes = mask_boxes(mask[:, 0] > 0)
        boxes = torch.stack([boxes[:, 0] * x_scale, boxes[:, 1] * y_scale, boxes[:, 2] * x_scale,
                             boxes[:, 3] * y_scale], dim=1)
        return {"labels": labels, "present": present, "mask": mask, "distance_maps": signed_distance_maps(mask),
                "boxes": boxes}

    def forward_and_loss(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``classes_per_image`` sampled classes per image, decoded from one encoding through ``self.network``
        (the module that trains), and the uncertainty-weighted joint loss against each class's mask and the
        frozen teacher's prompts."""
        targets = self.class_targets(target)
        prediction = self.network(data, class_labels=targets["labels"].view(data.shape[0], self.classes_per_image))
        teacher_sparse, teacher_dense = self.network_module.teacher_prompts(targets["boxes"])
        return self.joint_loss(mask_logits=prediction.mask_logits, target=targets["mask"],
                               distance_maps=targets["distance_maps"], sparse=prediction.sparse,
                               dense=prediction.dense, teacher_sparse=teacher_sparse, teacher_dense=teacher_dense,
                               labels=targets["labels"], present=targets["present"]).total

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        scales = self.network_module.uncertainty.scales().detach().cpu().tolist()
        self.logger.log(UNCERTAINTY_LOG_KEY, scales, self.current_epoch)
        self.print_to_log_file("uncertainty s_i: " + ", ".join(f"{name} {value:.4f}"
                                                             for name, value in zip(LOSS_TERMS, scales)))


@TRAINERS.register()
class AutoMedSAMTrainer_plateau(AutoMedSAMTrainer):
    """The paper's schedule: AdamW (0.9, 0.999, eps 1e-8) with ReduceLROnPlateau(0.9, patience 5) on the
    validation loss, and one lr for every trainable module, as the paper trains them."""

    class_prompt_lr_factor = 1.0

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.initial_lr, betas=(0.9, 0.999), eps=1e-8)
        return optimizer, ValidationPlateauScheduler(optimizer, factor=0.9, patience=5, cooldown=0)

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        super().on_validation_epoch_end(val_outputs)
        self.lr_scheduler.report(float(self.logger.get_value("val_losses", step=self.current_epoch)))


@TRAINERS.register()
class AutoMedSAMTrainer_one_class(AutoMedSAMTrainer):
    """One sampled class per training image and one lr for every module (samunet's AutoMedSAMTrainer before it
    prompted three classes and sped up the class-prompt encoder): slower to learn small classes within a short
    budget (docs/demo.md)."""

    classes_per_image = 1
    class_prompt_lr_factor = 1.0


@TRAINERS.register()
class AutoMedSAMTrainer_lora(AutoMedSAMTrainer):
    """Not the paper's: the image encoder adapted with SAMed's LoRA (rank 4 on q and v of every attention layer,
    at SAMedTrainer's lr 1e-3) instead of frozen; everything else is AutoMedSAMTrainer's. On real brain MRI the
    frozen encoder's features, prompted with the ground-truth box, segment three of four structures poorly,
    and the trainers that adapt the encoder (SAMed, H-SAM) learn them (docs/methods/automedsam.md)."""

    network_kwargs = {"lora_rank": 4}
