"""The base of every samunet trainer: an ``nnUNetTrainer`` for SAM-based networks.

What it adds to nnunetv2's trainer:
- the network comes from the plans through the static builder (a trainer may name its own
  network class), and pretrained SAM weights are loaded in ``initialize()`` only, because
  inference rebuilds the network and then loads the whole trained checkpoint;
- the optimiser sees only trainable parameters;
- deep supervision is asked of the network (``deep_supervision_scales``), not of a U-Net decoder;
- one training step for every method (:meth:`SAMTrainerBase.train_step`): a method changes only
  what its network is given and how the loss is computed (:meth:`SAMTrainerBase.forward_and_loss`),
  and the forward always goes through ``self.network``, the (compiled, DDP-wrapped) module that trains;
- the precision of the training and validation steps is a hyper-parameter (:mod:`samunet.precision`:
  nnU-Net's float16 autocast with its GradScaler on CUDA, float32 elsewhere, or bfloat16 autocast on CUDA
  and CPU), applied by one context, :meth:`SAMTrainerBase.autocast`; the loss always sees float32 outputs;
- training phases (:meth:`SAMTrainerBase.training_phase_starts`): a method whose modules start
  learning later (Self-Prompt-SAM) keeps them frozen until their phase begins;
- the final validation runs with the predictor the trainer names (``predictor_class``), on
  nnunetv2's public entry points (:mod:`samunet.trainers.validation`);
- hyper-parameters are class attributes that ``samunet_train`` can override; the overrides are
  a constructor argument, so nnunetv2 records them in the checkpoint's ``init_args`` and ``--c``
  restores them;
- checkpoints are written atomically and hold plain data only, so they load with
  ``torch.load(weights_only=True)`` (:mod:`samunet.trainers.checkpoints`); ``checkpoint_latest.pth`` is
  written after every epoch (nnU-Net: every 50), the last one included, so a crash loses at most the epoch it
  hit; every checkpoint records its data set and plans (:mod:`samunet.trainers.run_identity`), checked when
  it is loaded;
- ``progress.png`` is written atomically too (:mod:`samunet.trainers.progress_png`);
- a wall-clock budget (``max_minutes``, ``--max-minutes``): :class:`samunet.trainers.time_budget.TimeBudgetMixin`
  plans the epochs that fit, stretches the lr schedule over them and records the time spent in every checkpoint.
"""
from __future__ import annotations

import logging
import os
import pydoc
from typing import Any

import numpy as np
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch.amp import GradScaler
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import samunet
from samunet.backbones.catalog import get_backbone_spec
from samunet.errors import ConfigurationError
from samunet.host_allocator import return_freed_memory_when_tight
from samunet.inference.batched_predictor import BatchedPredictor
from samunet.networks.base import SAMNetworkConfig, SAMSegmentationNetwork
from samunet.registry import TRAINERS
from samunet.trainers.checkpoints import LATEST, read_checkpoint, save_checkpoint_atomically
from samunet.trainers.distributed import process_device
from samunet.trainers.labelled_subset import (LABELLED_SUBSET_HYPERPARAMETERS, check_labelled_options,
                                              describe_subset, labelled_training_dataset)
from samunet.precision import Precision, choose_precision, float32_loss_inputs
from samunet.trainers.progress_png import AtomicProgressLogger
from samunet.trainers.run_identity import CheckpointMismatchError, check_checkpoint_identity, run_identity
from samunet.trainers.time_budget import TimeBudget, TimeBudgetMixin, check_max_minutes
from samunet.trainers.validation import note_skipped_validation, run_final_validation
from samunet.weights import KNOWN_CHECKPOINTS, load_state_dict, resolve_checkpoint

logger = logging.getLogger(__name__)

HYPERPARAMETERS = ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch",
                   "initial_lr", "weight_decay", "batch_size", "weights", "precision", "max_minutes",
                   *LABELLED_SUBSET_HYPERPARAMETERS)


def plain_data(value: Any) -> Any:
    """numpy scalars/arrays, tuples and devices -> plain Python (what weights_only can load)."""
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.device):
        return str(value)
    return value


def oversampling_lost_to_rounding(batch_size: int, oversample_foreground_percent: float) -> bool:
    """Whether nnU-Net's data loader would force foreground on none of a batch's samples though the share asked
    for is above 0. Its rule (``nnUNetDataLoader._oversample_last_XX_percent``) forces sample i when
    ``i >= round(batch_size * (1 - percent))``: with the default 0.33 a batch of 2 forces one sample, a batch
    of 1 none, so every draw is a uniformly random location and a class that occupies a few slices of a volume
    is rarely seen. nnU-Net's batches are never below 2; samunet's slice-stack trainers plan batches of 1."""
    return oversample_foreground_percent > 0 and round(batch_size * (1 - oversample_foreground_percent)) >= batch_size


def unwrap(network: nn.Module) -> nn.Module:
    network = getattr(network, "module", network)
    return network._orig_mod if isinstance(network, OptimizedModule) else network


class SAMTrainerBase(TimeBudgetMixin, nnUNetTrainer):
    """Base of samunet's trainers. Subclasses set ``network_class`` / hyper-parameters and may
    override ``_build_loss`` and ``configure_optimizers``; they stay thin."""

    network_class: str | None = None  # None: the plans' architecture.network_class_name
    network_kwargs: dict = {}
    uses_deep_supervision = False
    optimizer_name = "sgd"  # "sgd" (nnU-Net's SGD, momentum 0.99, nesterov) or "adamw"
    default_hyperparameters: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnunetv2 records the constructor's arguments from its own locals(), so a subclass
        # cannot add any: hyper-parameter overrides come through set_hyperparameters().
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.configuration_manager = self.inference_configuration(self.configuration_manager)
        if self.is_ddp:  # nnunetv2 assumes CUDA and the global rank as device index; CPUs and nodes differ
            self.device = process_device(device.type)
        self.enable_deep_supervision = self.uses_deep_supervision
        self.pretrained_weights: str | None = None
        self.network_weights_source: str | None = None  # a checkpoint load_checkpoint is loading: no SAM weights
        self.hyperparameters: dict = {}
        self.precision: Precision  # set with the hyper-parameters
        self.time_budget = TimeBudget()  # --max-minutes (samunet.trainers.time_budget); its clock starts here
        self.set_hyperparameters({})
        self._epoch_progress: tqdm | None = None
        self.current_phase: int | None = None  # the training phase the network is set up for
        # checkpoint_latest.pth after every epoch (nnU-Net: every 50), so a crash loses at most the epoch it hit
        self.save_every = 1
        self.final_validation_cases: int | None = None  # --val_cases: validate only this many cases (None: all)
        self.skip_final_validation = False  # --disable_validation_inference
        self.logger.local_logger = AtomicProgressLogger(self.logger.local_logger.verbose)

    def set_hyperparameters(self, overrides: dict) -> None:
        """Apply the class defaults plus ``overrides`` (names in ``HYPERPARAMETERS``); call before
        ``initialize()``. They are stored in every checkpoint and restored by ``--c``.

        ``precision`` (:func:`samunet.precision.choose_precision`) also decides whether the trainer
        has a GradScaler; a precision the device cannot run raises ConfigurationError."""
        if self.was_initialized:
            raise RuntimeError("set hyper-parameters before the trainer is initialised")
        merged = {**self.default_hyperparameters, **self.hyperparameters, **overrides}
        unknown = sorted(set(merged) - set(HYPERPARAMETERS))
        if unknown:
            raise ConfigurationError(f"unknown hyper-parameters {unknown}; known: {list(HYPERPARAMETERS)}")
        self.precision = choose_precision(self.device.type, merged.get("precision"))
        self.time_budget.minutes = check_max_minutes(merged.get("max_minutes"))
        check_labelled_options(merged, uses_slice_stacks=getattr(self, "uses_slice_stacks", False))
        self.hyperparameters = merged
        for name, value in merged.items():
            if name == "weights":
                self.pretrained_weights = value
            elif name not in ("batch_size", "precision", "max_minutes"):
                setattr(self, name, value)
        if not self.precision.uses_grad_scaler:
            self.grad_scaler = None
        elif self.grad_scaler is None:
            self.grad_scaler = GradScaler("cuda")

    # ---- network --------------------------------------------------------------------------
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        architecture = configuration_manager.configuration["architecture"]
        class_name = cls.network_class or architecture["network_class_name"]
        network_class = pydoc.locate(class_name)
        if network_class is None:
            raise ImportError(f"network class {class_name!r} (from the plans or {cls.__name__}) cannot be imported")
        config, options = SAMNetworkConfig.split({
            **architecture["arch_kwargs"], **cls.network_kwargs, "input_channels": num_input_channels,
            "num_classes": num_output_channels,
            "deep_supervision": enable_deep_supervision and cls.uses_deep_supervision})
        return network_class(config, **options)

    @classmethod
    def inference_configuration(cls, configuration_manager: ConfigurationManager) -> ConfigurationManager:
        """The configuration the network trains and predicts with (patch size, batch size); the planned
        one, unless a trainer changes it (slice-stack trainers: (D, S, S) patches)."""
        return configuration_manager

    @classmethod
    def predictor_class(cls) -> type:
        """The nnunetv2 predictor class that slides this trainer's network over a volume: nnunetv2's, with
        several tiles per network call (:class:`samunet.inference.batched_predictor.BatchedPredictor`)."""
        return BatchedPredictor

    @property
    def network_module(self) -> SAMSegmentationNetwork:
        return unwrap(self.network)

    def initialize(self):
        """nnU-Net's ``initialize`` (batch size per rank, network from the plans, torch.compile, optimiser,
        loss), wrapping the network in DistributedDataParallel for CUDA and CPU processes alike (nnunetv2
        passes a CUDA device index, which a CPU module refuses), then the released SAM weights."""
        if self.was_initialized:
            raise RuntimeError("the trainer is already initialised")
        self._set_batch_size_and_oversample()
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self.network = self.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)
        if self._do_i_compile():
            self.print_to_log_file("Using torch.compile...")
            self.network = torch.compile(self.network)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        if self.is_ddp:
            # samunet's trainable parts have no BatchNorm (TinyViT's frozen ones stay in eval mode), so no SyncBatchNorm
            self.network = DDP(self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.loss = self._build_loss()
        self.loss.register_forward_pre_hook(float32_loss_inputs)  # float32 losses under autocast on every device
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.was_initialized = True
        self.logger.update_config({"hparas": {
            "initial_lr": self.initial_lr, "weight_decay": self.weight_decay,
            "oversample_foreground_percent": self.oversample_foreground_percent,
            "probabilistic_oversampling": self.probabilistic_oversampling,
            "num_iterations_per_epoch": self.num_iterations_per_epoch,
            "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch, "num_epochs": self.num_epochs,
            "enable_deep_supervision": self.enable_deep_supervision,
            "batch_size": self.configuration_manager.batch_size}})
        if self.network_weights_source is None:
            self.load_pretrained_backbone()
        else:  # --c / --val: every weight comes from the checkpoint (no "starts from RANDOM weights" warning)
            self.print_to_log_file(f"network weights from {self.network_weights_source} (the released backbone "
                                   f"weights are not loaded)")
        trainable = sum(p.numel() for p in self.network_module.trainable_parameters())
        total = sum(p.numel() for p in self.network_module.parameters())
        self.print_to_log_file(f"{self.__class__.__name__}: backbone {self.network_module.backbone}, "
                               f"{trainable:,} of {total:,} parameters train ({trainable / 1e6:.2f} M), "
                               f"precision {self.precision.name}")

    def get_tr_and_val_datasets(self):
        """nnU-Net's datasets of the fold, the training one restricted to the labelled subset that
        ``labelled_fraction`` asks for (:mod:`samunet.trainers.labelled_subset`); validation stays the full fold."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        labelled = labelled_training_dataset(
            dataset_tr, dataset_class=self.dataset_class, preprocessed_folder=self.preprocessed_dataset_folder,
            folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage,
            splits_folder=self.preprocessed_dataset_folder_base,
            data_identifier=self.configuration_manager.data_identifier, fold=self.fold,
            hyperparameters=self.hyperparameters, validation_cases=list(dataset_val.identifiers))
        if labelled is not dataset_tr:
            self.print_to_log_file(describe_subset(labelled, len(dataset_tr.identifiers)))
        return labelled, dataset_val

    def load_pretrained_backbone(self) -> None:
        """Load the released SAM weights named by ``weights`` (default: the backbone's default)."""
        spec = get_backbone_spec(self.network_module.backbone)
        choice = self.pretrained_weights if self.pretrained_weights is not None else spec.default_weights
        if choice in (None, "none", "random"):
            logger.warning("backbone %s starts from RANDOM weights (no pretrained checkpoint)", spec.name)
            self.print_to_log_file(f"WARNING: backbone {spec.name} starts from random weights")
            return
        path = resolve_checkpoint(choice)
        self.network_module.load_pretrained(load_state_dict(path, map_location="cpu"), source=str(path))
        self.print_to_log_file(f"loaded pretrained weights {path}")

    def _set_batch_size_and_oversample(self):
        """nnU-Net's rule, with ``--batch-size`` as the global batch size: a distributed run splits it over
        the ranks (and the foreground oversampling with it). Where that rule would force foreground on no
        sample of this process's batch (:func:`oversampling_lost_to_rounding`: a batch of one, as
        Self-Prompt-SAM's single slice stack), each sample is forced with the same probability instead
        (nnU-Net's own ``probabilistic_oversampling``)."""
        if "batch_size" in self.hyperparameters:
            self.configuration_manager.configuration["batch_size"] = int(self.hyperparameters["batch_size"])
        super()._set_batch_size_and_oversample()
        if not self.probabilistic_oversampling and oversampling_lost_to_rounding(
                self.batch_size, self.oversample_foreground_percent):
            self.probabilistic_oversampling = True
            self.print_to_log_file(
                f"a batch of {self.batch_size}: nnU-Net's rule would force foreground on none of its samples; each "
                f"sample is foreground-forced with probability {self.oversample_foreground_percent:g} instead "
                f"(probabilistic oversampling)")

    def dice_and_ce_loss(self, *, weight_ce: float, weight_dice: float) -> nn.Module:
        """nnU-Net's Dice + CE (Dice + BCE for region labels) with the given weights."""
        dice_kwargs = {"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "ddp": self.is_ddp}
        if self.label_manager.has_regions:
            return DC_and_BCE_loss({}, {**dice_kwargs, "do_bg": True}, weight_ce=weight_ce, weight_dice=weight_dice,
                                   use_ignore_label=self.label_manager.ignore_label is not None,
                                   dice_class=MemoryEfficientSoftDiceLoss)
        return DC_and_CE_loss({**dice_kwargs, "do_bg": False}, {}, weight_ce=weight_ce, weight_dice=weight_dice,
                              ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)

    def configure_optimizers(self):
        parameters = list(self.network_module.trainable_parameters())
        if self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(parameters, lr=self.initial_lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.SGD(parameters, lr=self.initial_lr, weight_decay=self.weight_decay,
                                        momentum=0.99, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # ---- training phases --------------------------------------------------------------------
    def training_phase_starts(self) -> tuple[int, ...]:
        """Epochs at which a training phase begins, ascending, the first 0. One phase by default."""
        return (0,)

    def training_phase(self, epoch: int) -> int:
        """Index of the phase ``epoch`` belongs to."""
        return sum(start <= epoch for start in self.training_phase_starts()) - 1

    def enter_training_phase(self, phase: int) -> None:
        """Make the network train what phase ``phase`` trains. ``on_train_epoch_start`` calls it when the
        phase of the epoch differs from the one the network is set up for (so at the first epoch, and
        after a resume). One phase: nothing changes."""

    def start_phase_of_current_epoch(self) -> None:
        """Enter the current epoch's phase if the network is not set up for it yet. DistributedDataParallel
        registers the parameters that need gradients when it wraps the network, so a DDP network is wrapped
        anew after the phase changed what trains."""
        phase = self.training_phase(self.current_epoch)
        if phase == self.current_phase:
            return
        self.enter_training_phase(phase)
        self.current_phase = phase
        if isinstance(self.network, DDP):
            self.network = DDP(self.network.module, device_ids=self.network.device_ids,
                               find_unused_parameters=self.network.find_unused_parameters)

    # ---- one training step ------------------------------------------------------------------
    def on_train_epoch_start(self):
        self.start_phase_of_current_epoch()
        super().on_train_epoch_start()
        self._epoch_progress = tqdm(total=self.num_iterations_per_epoch, desc=f"epoch {self.current_epoch}",
                                    unit="it", leave=False, disable=self.local_rank != 0)

    def forward_and_loss(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch: ``self.loss(self.network(data), target)``. A method that
        gives its network more than the image or computes its loss otherwise overrides this, and
        still calls ``self.network`` (the module that trains: compiled, DDP-wrapped)."""
        return self.loss(self.network(data), target)

    def autocast(self):
        """The autocast context of this trainer's precision around forward and loss (backward runs outside
        it, as torch recommends: autograd gives each gradient its forward's dtype); fp32: no autocast."""
        return self.precision.autocast()

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step (grad scaler for fp16, clipping at norm 12) around :meth:`forward_and_loss`, which runs
        under :meth:`autocast`."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.forward_and_loss(data, target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        value = loss.detach().cpu().numpy()
        return_freed_memory_when_tight()  # returns at once unless select_device kept freed memory (CPU only)
        if self._epoch_progress is not None:
            self._epoch_progress.update(1)
            self._epoch_progress.set_postfix(loss=f"{float(value):.3f}")
        return {"loss": value}

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (loss and pseudo Dice) under :meth:`autocast`. nnU-Net enters its own
        autocast on CUDA inside; it takes the dtype entered here, so bf16 stays bf16. (With fp32 on CUDA,
        nnU-Net's float16 autocast still applies to this step; the final validation predicts in fp32.)"""
        with self.autocast():
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """The final validation (:func:`samunet.trainers.validation.run_final_validation`), thinned to
        ``final_validation_cases``; with ``skip_final_validation`` only a note in the log."""
        if self.skip_final_validation:
            note_skipped_validation(self)
            return
        run_final_validation(self, save_probabilities, num_cases=self.final_validation_cases)

    def on_epoch_end(self):
        """nnU-Net's epoch end (checkpoint_latest.pth every ``save_every`` epochs, checkpoint_best.pth,
        progress.png), plus checkpoint_latest.pth after the last epoch, which nnU-Net leaves to
        checkpoint_final.pth: a crash while that is written then continues after the last epoch."""
        finished = self.current_epoch
        super().on_epoch_end()
        if finished == self.num_epochs - 1:
            self.current_epoch = finished  # save_checkpoint records the epoch after the current one
            try:
                self.save_checkpoint(os.path.join(self.output_folder, LATEST))
            finally:
                self.current_epoch = finished + 1

    def on_train_epoch_end(self, train_outputs: list[dict]):
        if self._epoch_progress is not None:
            self._epoch_progress.close()
            self._epoch_progress = None
        super().on_train_epoch_end(train_outputs)

    def add_log_key(self, key: str) -> None:
        """Let ``self.logger.log(key, value, epoch)`` record a per-epoch value nnU-Net does not log itself
        (its local logger accepts only keys it already holds; they travel with every checkpoint)."""
        self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    # ---- deep supervision -------------------------------------------------------------------
    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        return self.network_module.deep_supervision_scales()

    def set_deep_supervision_enabled(self, enabled: bool):
        self.network_module.deep_supervision = bool(enabled) and self.uses_deep_supervision

    # ---- checkpoints --------------------------------------------------------------------------
    def checkpoint_metadata(self) -> dict:
        module = self.network_module
        return {"version": samunet.__version__, "backbone": module.backbone, "img_size": module.img_size,
                "stack_depth": getattr(module, "stack_depth", None),
                "hyperparameters": plain_data(self.hyperparameters), "identity": plain_data(self.run_identity()),
                "time_budget": plain_data(self.time_budget.state())}

    def run_identity(self) -> dict:
        """The data set and plans this trainer trains on (:mod:`samunet.trainers.run_identity`)."""
        return run_identity(dataset_name=self.plans_manager.dataset_name,
                            plans_identifier=self.plans_manager.plans_name, configuration=self.configuration_name,
                            plans=self.plans_manager.plans)

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self.network_module.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": plain_data(self.logger.get_checkpoint()),
            "_best_ema": plain_data(self._best_ema),
            "current_epoch": self.current_epoch + 1,
            "init_args": plain_data(self.my_init_kwargs),
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": plain_data(self.inference_allowed_mirroring_axes),
            "samunet": self.checkpoint_metadata(),
        }
        save_checkpoint_atomically(checkpoint, filename)

    def check_checkpoint_fits(self, checkpoint: dict, source: str) -> None:
        """Refuse a checkpoint of another trainer or backbone, or of another data set or plans, with a message
        that says which."""
        meta = checkpoint.get("samunet", {})
        module = self.network_module
        if checkpoint.get("trainer_name") not in (None, self.__class__.__name__):
            raise CheckpointMismatchError(f"{source} was trained with {checkpoint['trainer_name']}, "
                                          f"not {self.__class__.__name__}; pass -tr {checkpoint['trainer_name']}")
        check_network_fits(meta, module, source)
        check_checkpoint_identity(checkpoint, dataset_name=self.plans_manager.dataset_name,
                                  plans_identifier=self.plans_manager.plans_name, plans=self.plans_manager.plans,
                                  source=source)

    def load_checkpoint(self, filename_or_checkpoint: dict | str, source: str | None = None) -> None:
        """Restore a checkpoint (a file, read with ``weights_only=True``, or one already loaded from ``source``)
        after checking that it belongs to this trainer, network, data set and plans."""
        named = isinstance(filename_or_checkpoint, (str, os.PathLike))
        source = str(filename_or_checkpoint) if named else source or "checkpoint"
        if not self.was_initialized:
            self.network_weights_source = source
            self.initialize()
        if named:
            checkpoint = read_checkpoint(filename_or_checkpoint, map_location=self.device)
        else:
            checkpoint = filename_or_checkpoint
        self.check_checkpoint_fits(checkpoint, source)
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.time_budget.restore(checkpoint.get("samunet", {}).get("time_budget"))
        mirroring = checkpoint.get("inference_allowed_mirroring_axes")
        self.inference_allowed_mirroring_axes = tuple(mirroring) if mirroring is not None else None
        self.network_module.load_state_dict(checkpoint["network_weights"])
        check_optimizer_fits(checkpoint["optimizer_state"], self.optimizer, source)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])


def check_optimizer_fits(state: dict, optimizer: torch.optim.Optimizer, source: str) -> None:
    """Refuse an optimizer state whose parameter groups differ from ``optimizer``'s in number or size: the
    trainer's recipe changed since ``source`` was written (e.g. AutoMedSAMTrainer's class-prompt group of
    2026-11-30). torch's own ValueError names no file and no way out. Raises CheckpointMismatchError."""
    saved = [len(group["params"]) for group in state.get("param_groups", [])]
    current = [len(group["params"]) for group in optimizer.param_groups]
    if saved != current:
        raise CheckpointMismatchError(
            f"{source} holds an optimizer state for parameter groups of {saved} tensors, but this trainer's "
            f"optimizer has groups of {current}: the trainer's recipe changed since the checkpoint was written; "
            f"continue it with the samunet version that wrote it, or start a new run from its weights with "
            f"-pretrained_weights {source}")


def check_network_fits(meta: dict, network: nn.Module, source: str) -> None:
    """Refuse a checkpoint (its ``samunet`` metadata ``meta``) made for another backbone, input size or
    slice-stack depth than ``network``, saying which; entries the metadata lacks are not checked."""
    if meta.get("backbone") not in (None, network.backbone) or meta.get("img_size") not in (None, network.img_size):
        raise CheckpointMismatchError(
            f"{source} was trained with backbone {meta.get('backbone')} at {meta.get('img_size')} px, but this "
            f"network is {network.backbone} at {network.img_size} px; use the plans/--backbone it was trained with")
    depth = getattr(network, "stack_depth", None)
    if meta.get("stack_depth") not in (None, depth):
        raise CheckpointMismatchError(f"{source} was trained on stacks of {meta['stack_depth']} slices, this network "
                                      f"takes {depth}; pass --depth {meta['stack_depth']}")


def register_variants(base: type[SAMTrainerBase], variants: dict[str, tuple[str, dict]], namespace: dict) -> None:
    """Register one trainer per entry ``name: (description, network option changes)``: ``base`` with the
    changes merged into its ``network_kwargs`` (an ablation or a setting of the same method). Each class
    also goes into ``namespace`` (the calling module's ``globals()``), so ``module.name`` imports it like a
    class statement would. Every variant of every method is declared this way, in a table whose keys are
    the literal trainer names."""
    for name, (description, changes) in variants.items():
        trainer = type(name, (base,), {
            "network_kwargs": {**base.network_kwargs, **changes}, "__module__": namespace["__name__"],
            "__qualname__": name, "__doc__": f"{description} ({base.__name__} with {changes})"})
        namespace[name] = TRAINERS.register()(trainer)


def known_pixel_normalization(weights: str | None) -> str | None:
    """The pixel normalisation a known checkpoint (by name or file name) was trained with."""
    if weights is None:
        return None
    for entry in KNOWN_CHECKPOINTS.values():
        if weights == entry.name or os.path.basename(str(weights)) == entry.filename:
            return entry.pixel_normalization
    return None
