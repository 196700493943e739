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
from samunet.trainers.base import SAMTrainerBase, register_variants

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


# Table 5's ablations (HSPSAMTrainer is Ablation_3) and the prompt-quantity study (Fig. 3): c Q&A prompt
# pairs per level, whatever the number of classes.
register_variants(HSPSAMTrainer, {
    "HSPSAMTrainer_QAOnly": ("Table 5, Ablation_1: Q&A prompt pairs on one level, no hierarchy",
                             {"hierarchical": False, "skip_connections": False}),
    "HSPSAMTrainer_NoSkip": ("Table 5, Ablation_2: Q&A pairs and hierarchical decoding, no skip connections",
                             {"skip_connections": False}),
    "HSPSAMTrainer_HierarchyOnly": ("Table 5, Ablation_4: hierarchical decoding alone",
                                    {"qa_prompts": False, "skip_connections": False}),
    "HSPSAMTrainer_NoQA": ("Table 5, Ablation_5: hierarchical decoding with skip connections, no Q&A pairs",
                           {"qa_prompts": False}),
    "HSPSAMTrainer_1prompts": ("Fig. 3: 1 Q&A prompt pair per level", {"num_prompts": 1}),
    "HSPSAMTrainer_2prompts": ("Fig. 3: 2 Q&A prompt pairs per level", {"num_prompts": 2}),
    "HSPSAMTrainer_4prompts": ("Fig. 3: 4 Q&A prompt pairs per level", {"num_prompts": 4}),
    "HSPSAMTrainer_8prompts": ("Fig. 3: 8 Q&A prompt pairs per level", {"num_prompts": 8}),
    "HSPSAMTrainer_16prompts": ("Fig. 3: 16 Q&A prompt pairs per level", {"num_prompts": 16}),
}, globals())
