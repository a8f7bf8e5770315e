"""dscl: Decoupled Contrastive Learning for long-tailed recognition (Xuan & Zhang, AAAI 2024)."""

__version__ = "0.1.0"
