"""Small reference models, written the way users write them (plain torchdiffeq / torchcde / torchsde calls)."""
from .cnf import CNF, CNFField, ConcatSquashLinear
from .latent_ode import LatentODE, LatentODEFunc, ODERNN, ODERNNField, RecognitionRNN
from .latent_sde import LatentSDE
from .neural_cde import CDEFunc, NeuralCDE

__all__ = ["CNF", "CNFField", "ConcatSquashLinear", "LatentODE", "LatentODEFunc", "RecognitionRNN", "ODERNN",
           "ODERNNField", "CDEFunc", "NeuralCDE", "LatentSDE"]
