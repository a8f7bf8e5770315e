"""dscl: Decoupled Contrastive Learning for long-tailed recognition (Xuan & Zhang, AAAI 2024).

``from dscl import load_run`` gives a finished run as a :class:`~dscl.inference.Predictor`
(``predict`` / ``embed``); the name is imported on first use, so ``import dscl`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__", "load_run"]

if TYPE_CHECKING:
    from dscl.inference import Predictor, load_run


def __getattr__(name: str) -> Any:
    if name in ("load_run", "Predictor"):
        from dscl import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'dscl' has no attribute {name!r}")
