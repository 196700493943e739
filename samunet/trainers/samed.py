"""SAMedTrainer: prompt-free SAM with LoRA, the baseline the four methods must beat.

Network: ``samunet.networks.samed.SAMedNetwork`` (LoRA rank 4 on q and v of every encoder
block, trainable default prompt embedding, one mask token per class). Loss: nnU-Net's own
CE + Dice (weights 1 and 1). Schedule: poly LR (0.9). Optimiser: AdamW with SAMed's weight
decay 0.1 (Zhang & Liu, 2023); lr 1e-3 because samunet's poly schedule has no warm-up
(SAMed used 5e-3 after one).
"""
from samunet.registry import TRAINERS
from samunet.trainers.base import SAMTrainerBase


@TRAINERS.register()
class SAMedTrainer(SAMTrainerBase):
    network_class = "samunet.networks.samed.SAMedNetwork"
    network_kwargs = {"lora_rank": 4}
    optimizer_name = "adamw"
    default_hyperparameters = {"initial_lr": 1e-3, "weight_decay": 0.1}
