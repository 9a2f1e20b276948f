"""scm_lightning: continuous-time consistency distillation (sCM) on PyTorch Lightning."""

__version__ = "0.1.0"
