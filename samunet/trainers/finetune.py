"""Fine-tuning from a trained samunet model: ``samunet_train ... -pretrained_weights CHECKPOINT``.

nnU-Net's ``-pretrained_weights`` (``nnunetv2.run.load_pretrained_weights``) copies a trained
network's weights into the freshly initialised network of a new training, e.g. to adapt a model
trained on one data set to another. samunet does the same with its own checkpoints: every tensor
of the checkpoint's ``network_weights`` whose name and shape match the new network is loaded;
tensors whose shape differs (the class heads when the new data set has another number of classes)
keep their fresh initialisation and are named in a warning, and so are names only one side has.

This is not ``--weights``: that names the released SAM backbone checkpoint the network starts from
(loaded in ``initialize()``); ``-pretrained_weights`` is a samunet training checkpoint
(``checkpoint_final.pth``) and is loaded after it, replacing what it covers.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from samunet.errors import ConfigurationError
from samunet.trainers.base import check_network_fits, unwrap

logger = logging.getLogger(__name__)

MAX_NAMED = 20


@dataclass
class PretrainedWeightsReport:
    """What :func:`load_pretrained_weights` did with each tensor of the checkpoint."""

    source: str
    loaded: list[str] = field(default_factory=list)
    shape_mismatch: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # in the network, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the network

    def lines(self) -> list[str]:
        """One line per kind of tensor, for the console and the training log."""
        out = [f"fine-tuning from {self.source}: loaded {len(self.loaded)} tensors"]
        if self.shape_mismatch:
            named = ", ".join(f"{k} {list(a)} -> {list(b)}" for k, a, b in
                              ((k, *v) for k, v in list(self.shape_mismatch.items())[:MAX_NAMED]))
            out.append(f"skipped {len(self.shape_mismatch)} tensor(s) of another shape (kept freshly initialised): "
                       f"{named}{' ...' if len(self.shape_mismatch) > MAX_NAMED else ''}")
        if self.missing:
            out.append(f"{len(self.missing)} tensor(s) of the network are not in the checkpoint (kept freshly "
                       f"initialised): {_named(self.missing)}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} tensor(s) of the checkpoint are not in the network (ignored): "
                       f"{_named(self.unexpected)}")
        return out


def _named(keys: list[str]) -> str:
    return ", ".join(keys[:MAX_NAMED]) + (" ..." if len(keys) > MAX_NAMED else "")


@dataclass
class PretrainedWeights:
    """A samunet training checkpoint read for ``-pretrained_weights``: its file, network weights and metadata."""

    path: str
    weights: dict[str, torch.Tensor]
    meta: dict


def read_pretrained_weights(path: str | os.PathLike) -> PretrainedWeights:
    """Read a samunet training checkpoint for ``-pretrained_weights`` (``weights_only=True``); samunet_train
    calls it before it writes anything into the fold folder. Raises :class:`ConfigurationError` naming the file
    when it is missing, cannot be loaded (truncated, a pickle) or holds no ``network_weights``."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigurationError(f"-pretrained_weights {path} does not exist; give a samunet checkpoint such as "
                                 f"$nnUNet_results/DATASET/TRAINER__PLANS__2d/fold_0/checkpoint_final.pth")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip or weights_only refusals all mean: not a usable checkpoint
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise ConfigurationError(f"-pretrained_weights {path} cannot be loaded with weights_only=True "
                                 f"({type(error).__name__}: {first_line}); it is truncated or not a samunet "
                                 f"training checkpoint: give an intact checkpoint_final.pth") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise ConfigurationError(f"-pretrained_weights {path} is not a samunet/nnU-Net training checkpoint (it has no "
                                 f"'network_weights'); a released SAM checkpoint goes to --weights instead")
    return PretrainedWeights(path, checkpoint["network_weights"], dict(checkpoint.get("samunet") or {}))


def load_pretrained_weights(network: nn.Module,
                            path: str | os.PathLike | PretrainedWeights) -> PretrainedWeightsReport:
    """Load the trained network weights in ``path`` (a file, or one already read by
    :func:`read_pretrained_weights`) into ``network`` (nnU-Net's ``-pretrained_weights``).

    Tensors with the same name and shape are copied; the others are reported (and logged as a
    warning naming them). A checkpoint of another backbone, input size or stack depth is refused, as
    is one that shares no tensor with the network.
    """
    module = unwrap(network)
    pretrained = path if isinstance(path, PretrainedWeights) else read_pretrained_weights(path)
    weights, meta, path = pretrained.weights, pretrained.meta, pretrained.path
    check_network_fits(meta, module, str(path))
    own = module.state_dict()
    report = PretrainedWeightsReport(source=str(path))
    chosen = {}
    for key, value in weights.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.shape_mismatch[key] = (tuple(value.shape), tuple(own[key].shape))
        else:
            chosen[key] = value
            report.loaded.append(key)
    report.missing = [key for key in own if key not in weights]
    if not chosen:
        raise ConfigurationError(f"-pretrained_weights {path} shares no tensor (same name and shape) with this "
                                 f"network; was it trained with another method or backbone?")
    module.load_state_dict(chosen, strict=False)
    lines = report.lines()
    logger.info(lines[0])
    for line in lines[1:]:
        logger.warning(line)
    return report
