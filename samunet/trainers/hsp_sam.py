"""HSPSAMTrainer: Hierarchical Self-Prompting SAM (Q&A prompt pairs, hierarchical feature fusion).

Network: ``samunet.networks.hsp_sam.HSPSAMNetwork`` (LoRA rank 32 on q and v of every encoder
block, c = number of foreground classes Q&A prompt pairs per hierarchy level, one decoder block and neck per
level, eq. 6 fusion with skip connections). Loss: 0.8 Dice + 0.2 CE (the paper's alpha = 0.8),
nnU-Net's Dice settings otherwise. Schedule: poly LR (0.9). Optimiser: the paper names none;
AdamW with lr 1e-3 and weight decay 0.1 as for SAMed, whose LoRA fine-tuning HSP-SAM follows.

Table 5's ablations are trainers of their own (same network, flags in ``network_kwargs``):
``HSPSAMTrainer_QAOnly`` (Ablation_1), ``HSPSAMTrainer_NoSkip`` (Ablation_2),
``HSPSAMTrainer_HierarchyOnly`` (Ablation_4), ``HSPSAMTrainer_NoQA`` (Ablation_5);
``HSPSAMTrainer`` is Ablation_3, the paper's full model. ``HSPSAMTrainer_<c>prompts`` set the
number of prompt pairs for the prompt-quantity study (1, 2, 4, 8, 16).
"""
from samunet.registry import TRAINERS
from samunet.trainers.base import SAMTrainerBase

DICE_WEIGHT = 0.8  # alpha of the paper's loss (section 3.5)
CE_WEIGHT = 1.0 - DICE_WEIGHT

FULL_MODEL = {"lora_rank": 32, "qa_prompts": True, "hierarchical": True, "skip_connections": True}


@TRAINERS.register()
class HSPSAMTrainer(SAMTrainerBase):
    network_class = "samunet.networks.hsp_sam.HSPSAMNetwork"
    network_kwargs = dict(FULL_MODEL)
    optimizer_name = "adamw"
    default_hyperparameters = {"initial_lr": 1e-3, "weight_decay": 0.1}

    def initialize(self):
        super().initialize()  # logs the trainable-parameter count
        network = self.network_module
        prompts = network.qa_prompts[0].num_prompts if network.qa_prompts is not None else 0
        self.print_to_log_file(f"HSP-SAM: {len(network.levels)} hierarchy level(s), {prompts} Q&A prompt "
                               f"pair(s) per level, skip connections {network.skip_connections}, "
                               f"LoRA rank {network.lora[0].rank}")

    def _build_loss(self):
        return self.dice_and_ce_loss(weight_ce=CE_WEIGHT, weight_dice=DICE_WEIGHT)


@TRAINERS.register()
class HSPSAMTrainer_QAOnly(HSPSAMTrainer):
    """Table 5, Ablation_1: Q&A prompt pairs on one level, no hierarchy."""
    network_kwargs = {**FULL_MODEL, "hierarchical": False, "skip_connections": False}


@TRAINERS.register()
class HSPSAMTrainer_NoSkip(HSPSAMTrainer):
    """Table 5, Ablation_2: Q&A prompt pairs and hierarchical decoding, no skip connections."""
    network_kwargs = {**FULL_MODEL, "skip_connections": False}


@TRAINERS.register()
class HSPSAMTrainer_HierarchyOnly(HSPSAMTrainer):
    """Table 5, Ablation_4: hierarchical decoding alone."""
    network_kwargs = {**FULL_MODEL, "qa_prompts": False, "skip_connections": False}


@TRAINERS.register()
class HSPSAMTrainer_NoQA(HSPSAMTrainer):
    """Table 5, Ablation_5: hierarchical decoding with skip connections, no Q&A prompt pairs."""
    network_kwargs = {**FULL_MODEL, "qa_prompts": False}


# The prompt-quantity study (Fig. 3): c Q&A prompt pairs per level, whatever the number of classes.


@TRAINERS.register()
class HSPSAMTrainer_1prompts(HSPSAMTrainer):
    """The full model with 1 Q&A prompt pair per level."""
    network_kwargs = {**FULL_MODEL, "num_prompts": 1}


@TRAINERS.register()
class HSPSAMTrainer_2prompts(HSPSAMTrainer):
    """The full model with 2 Q&A prompt pairs per level."""
    network_kwargs = {**FULL_MODEL, "num_prompts": 2}


@TRAINERS.register()
class HSPSAMTrainer_4prompts(HSPSAMTrainer):
    """The full model with 4 Q&A prompt pairs per level."""
    network_kwargs = {**FULL_MODEL, "num_prompts": 4}


@TRAINERS.register()
class HSPSAMTrainer_8prompts(HSPSAMTrainer):
    """The full model with 8 Q&A prompt pairs per level."""
    network_kwargs = {**FULL_MODEL, "num_prompts": 8}


@TRAINERS.register()
class HSPSAMTrainer_16prompts(HSPSAMTrainer):
    """The full model with 16 Q&A prompt pairs per level."""
    network_kwargs = {**FULL_MODEL, "num_prompts": 16}
