"""Small reference models, written the way users write them (plain torchdiffeq calls)."""
from .latent_ode import LatentODE, LatentODEFunc, ODERNN, ODERNNField, RecognitionRNN

__all__ = ["LatentODE", "LatentODEFunc", "RecognitionRNN", "ODERNN", "ODERNNField"]
