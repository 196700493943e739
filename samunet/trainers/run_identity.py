"""What a trained checkpoint belongs to: its data set and its plans.

Every checkpoint (and the run settings of a fold folder) records the data set name, the plans identifier,
the configuration and a fingerprint of the plans that shape the data and the network (the configuration's
entries except the batch size, the axis order and the intensity statistics the normalisation uses). A
checkpoint of another data set with the same classes loads into the same network without an error, so
``--c``, ``--val`` and prediction compare this record with the plans they use.
"""
from __future__ import annotations

import hashlib
import json
import logging

from samunet.errors import SamunetError

logger = logging.getLogger(__name__)

# Configuration entries that do not change what a checkpoint's weights mean.
NOT_FINGERPRINTED = ("batch_size",)
# Plans entries outside the configuration that shape its inputs.
FINGERPRINTED_PLANS_ENTRIES = ("transpose_forward", "foreground_intensity_properties_per_channel")


class CheckpointMismatchError(SamunetError, RuntimeError):
    """A trained checkpoint does not belong to the network, data set or plans it is loaded for."""


def plans_fingerprint(plans: dict, configuration: str) -> str | None:
    """A short hash of what in ``plans`` shapes ``configuration``'s data and network; None when the plans do
    not hold that configuration."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    if configuration not in plans.get("configurations", {}):
        return None
    resolved = PlansManager(plans).get_configuration(configuration).configuration
    relevant = {"configuration": {k: v for k, v in resolved.items() if k not in NOT_FINGERPRINTED},
                **{k: plans.get(k) for k in FINGERPRINTED_PLANS_ENTRIES}}
    text = json.dumps(relevant, sort_keys=True, default=lambda value: value.tolist() if hasattr(value, "tolist")
                      else str(value))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_identity(*, dataset_name: str, plans_identifier: str, configuration: str, plans: dict) -> dict:
    """The record a checkpoint and the run settings carry (plain data)."""
    return {"dataset_name": dataset_name, "plans_identifier": plans_identifier, "configuration": configuration,
            "plans_fingerprint": plans_fingerprint(plans, configuration)}


def check_identity(record: dict | None, *, dataset_name: str, plans_identifier: str, plans: dict,
                   source: str) -> None:
    """Refuse ``record`` (what ``source`` was written for) unless it names ``dataset_name`` and
    ``plans_identifier`` and its configuration has the same fingerprint in ``plans``. A missing record (written
    by samunet before it kept one) is accepted with a warning. Raises :class:`CheckpointMismatchError`."""
    if not record:
        logger.warning("%s records no data set or plans (written by an older samunet); it is used unchecked "
                       "for %s / %s", source, dataset_name, plans_identifier)
        return
    trained_for = f"{record.get('dataset_name')} with plans {record.get('plans_identifier')}"
    if record.get("dataset_name") != dataset_name or record.get("plans_identifier") != plans_identifier:
        raise CheckpointMismatchError(
            f"{source} belongs to {trained_for}, not to {dataset_name} with plans {plans_identifier}; it was copied "
            f"or moved here: put this model's own file back, or train this fold anew")
    configuration = record.get("configuration")
    if plans_fingerprint(plans, configuration) != record.get("plans_fingerprint"):
        raise CheckpointMismatchError(
            f"{source} was written for other {plans_identifier} plans of {dataset_name} (configuration "
            f"{configuration!r} differs: re-planned, or another --backbone/--depth/--weights since?); use the "
            f"plans and options it was trained with, or train this fold anew")


def check_checkpoint_identity(checkpoint: dict, *, dataset_name: str, plans_identifier: str, plans: dict,
                              source: str) -> None:
    """Refuse a loaded checkpoint of another data set or other plans (:func:`check_identity` on the record
    under ``checkpoint["samunet"]["identity"]``); training (``--c``, ``--val``) and prediction call it."""
    check_identity((checkpoint.get("samunet") or {}).get("identity"), dataset_name=dataset_name,
                   plans_identifier=plans_identifier, plans=plans, source=source)
