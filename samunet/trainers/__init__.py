"""samunet's trainers (thin nnUNetTrainer subclasses), registered in ``samunet.registry.TRAINERS``."""
from samunet.trainers.base import SAMTrainerBase
from samunet.trainers.samed import SAMedTrainer

__all__ = ["SAMTrainerBase", "SAMedTrainer"]
