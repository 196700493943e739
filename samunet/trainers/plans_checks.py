"""Checks of the plans a training is about to use, run before anything is written into the fold folder.

- :func:`check_plans_configuration`: the configuration exists (samunet plans only ``2d``) and its patch size,
  backbone, input size, depth and stacks per batch fit the network the trainer builds (plans edited by hand
  are the usual cause), so a misfit is one line instead of a traceback in the first forward pass.
- :func:`check_model_folder_plans`: a new training of one fold would replace the model folder's
  ``plans.json``; when other folds hold checkpoints trained with different plans (re-planned since, or other
  ``--backbone``/``--depth``/``--weights``), they would become unusable, so the training is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from samunet.errors import ConfigurationError, SamunetError

PLANNED_CONFIGURATION = "2d"
NNUNET_CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


def check_plans_configuration(plans: dict, configuration: str, trainer_class: type, source: str) -> None:
    """Refuse ``configuration`` of ``plans`` (read from ``source``) unless the trainer's network can be built
    and run on its patches: the configuration is in the plans, its ``patch_size`` is ``[S, S]`` with ``S`` the
    architecture's ``img_size``, ``img_size`` is an input size of its backbone, and for slice-stack trainers
    ``depth`` and ``slice_stack_batch_size`` (when given) are positive integers. Raises
    :class:`ConfigurationError` (or ``UnknownNameError`` for an unknown backbone) saying what to change."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from samunet.backbones.catalog import check_img_size, get_backbone_spec
    configurations = plans.get("configurations") or {}
    if configuration not in configurations:
        if configuration in NNUNET_CONFIGURATIONS:
            raise ConfigurationError(
                f"configuration {configuration!r} is not in {source}: samunet plans only {PLANNED_CONFIGURATION!r} "
                f"(SAM encoders see slices; slice-stack trainers such as SelfPromptSAMTrainer add 3d context within "
                f"it), and planning again never adds {configuration!r}; train with `samunet_train DATASET "
                f"{PLANNED_CONFIGURATION} FOLD`")
        raise ConfigurationError(f"configuration {configuration!r} is not in {source} (it has "
                                 f"{sorted(configurations)})")
    resolved = PlansManager(plans).get_configuration(configuration).configuration
    arch_kwargs = (resolved.get("architecture") or {}).get("arch_kwargs") or {}
    img_size, backbone = arch_kwargs.get("img_size"), arch_kwargs.get("backbone")
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1 or not isinstance(backbone, str):
        raise ConfigurationError(f"{source}: configuration {configuration!r} has architecture.arch_kwargs "
                                 f"img_size={img_size!r}, backbone={backbone!r}; samunet's planner writes an "
                                 f"integer input size and a backbone name: plan the data set again")
    try:
        check_img_size(get_backbone_spec(backbone), img_size)
    except ConfigurationError as error:
        raise ConfigurationError(f"{source}: configuration {configuration!r}: {error} (or plan the data set "
                                 f"again with samunet_plan_and_preprocess --image-size N)") from error
    patch_size = resolved.get("patch_size")
    if list(patch_size or []) != [img_size, img_size]:
        shape = "slice stacks take their depth from arch_kwargs.depth, " if (
            isinstance(patch_size, (list, tuple)) and len(patch_size) != 2) else ""
        raise ConfigurationError(f"{source}: configuration {configuration!r} has patch_size {patch_size!r}, but its "
                                 f"network (backbone {backbone}, img_size {img_size}) takes {img_size} x {img_size} "
                                 f"slices ({shape}the patch is one slice); set patch_size to [{img_size}, {img_size}], "
                                 f"or plan again with samunet_plan_and_preprocess --image-size N for another size")
    depth = arch_kwargs.get("depth", 1)
    if getattr(trainer_class, "uses_slice_stacks", False) and (
            not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
        raise ConfigurationError(f"{source}: configuration {configuration!r} has arch_kwargs.depth {depth!r}; "
                                 f"{trainer_class.__name__} needs a positive number of slices per stack (set it, "
                                 f"or give --depth N)")
    stacks = resolved.get("slice_stack_batch_size")
    if getattr(trainer_class, "uses_slice_stacks", False) and stacks is not None and (
            not isinstance(stacks, int) or isinstance(stacks, bool) or stacks < 1):
        raise ConfigurationError(f"{source}: configuration {configuration!r} has slice_stack_batch_size {stacks!r}; "
                                 f"{trainer_class.__name__} needs a positive number of stacks per batch (set it, "
                                 f"or give --batch-size N)")
    batch_size = resolved.get("batch_size")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigurationError(f"{source}: configuration {configuration!r} has batch_size {batch_size!r}; set a "
                                 f"positive integer (or give --batch-size N)")


def folds_with_checkpoints(model_folder: str | os.PathLike, *, except_folder: str | os.PathLike) -> list[str]:
    """The ``fold_*`` folders of ``model_folder`` (other than ``except_folder``) that hold a checkpoint."""
    except_folder = Path(except_folder)
    return sorted(folder.name for folder in Path(model_folder).glob("fold_*")
                  if folder.is_dir() and folder != except_folder and any(folder.glob("checkpoint_*.pth")))


def check_model_folder_plans(fold_folder: str | os.PathLike, plans: dict, configuration: str,
                             plans_identifier: str) -> None:
    """Refuse a new training of ``fold_folder`` when its model folder's ``plans.json`` differs from ``plans``
    in what shapes ``configuration`` (:func:`samunet.trainers.run_identity.plans_fingerprint`) while other
    folds hold checkpoints trained with it: the training would replace plans.json and make those folds
    unusable. ``plans``: the plans the training will use, with its ``--backbone``/``--depth``/``--weights``
    applied. Raises :class:`ConfigurationError` naming the folds and what to do."""
    from samunet.trainers.run_identity import plans_fingerprint
    fold_folder = Path(fold_folder)
    model_plans_file = fold_folder.parent / "plans.json"
    if not model_plans_file.is_file():
        return
    trained = folds_with_checkpoints(fold_folder.parent, except_folder=fold_folder)
    if not trained:
        return
    try:
        model_plans = json.loads(model_plans_file.read_text(encoding="utf-8"))
        model_fingerprint = plans_fingerprint(model_plans, configuration)
    except (OSError, ValueError, TypeError, KeyError, SamunetError):  # unreadable: the folds' own checks decide
        return
    if model_fingerprint == plans_fingerprint(plans, configuration):
        return
    raise ConfigurationError(
        f"{model_plans_file} holds other {plans_identifier} plans than this training would use (re-planned since, "
        f"or other --backbone/--depth/--weights?), and {', '.join(trained)} hold(s) checkpoints trained with them; "
        f"training {fold_folder.name} would replace plans.json and make them unusable. Plan the new settings under "
        f"another name (samunet_plan_and_preprocess -overwrite_plans_name NAME, then samunet_train -p NAME), "
        f"train with the options those folds were trained with, or delete those fold folders")
