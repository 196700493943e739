"""samunet's trainers (thin nnUNetTrainer subclasses), registered in ``samunet.registry.TRAINERS``."""
from samunet.trainers.base import SAMTrainerBase
from samunet.trainers.h_sam import HSAMTrainer
from samunet.trainers.hsp_sam import HSPSAMTrainer
from samunet.trainers.samed import SAMedTrainer

__all__ = ["HSAMTrainer", "HSPSAMTrainer", "SAMTrainerBase", "SAMedTrainer"]
