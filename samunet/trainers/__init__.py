"""samunet's trainers (thin nnUNetTrainer subclasses), registered in ``samunet.registry.TRAINERS``."""
from samunet.trainers.automedsam import AutoMedSAMTrainer, AutoMedSAMTrainer_plateau
from samunet.trainers.base import SAMTrainerBase
from samunet.trainers.h_sam import HSAMTrainer
from samunet.trainers.hsp_sam import HSPSAMTrainer
from samunet.trainers.samed import SAMedTrainer
from samunet.trainers.self_prompt_sam import SelfPromptSAMTrainer

__all__ = ["AutoMedSAMTrainer", "AutoMedSAMTrainer_plateau", "HSAMTrainer", "HSPSAMTrainer", "SAMTrainerBase",
           "SAMedTrainer", "SelfPromptSAMTrainer"]
