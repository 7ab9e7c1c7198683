"""riskfast: fast risk-based and likelihood-ratio objectives for post-training.

* :mod:`riskfast.riskpo` - RiskPO advantages (bundles, Mixed-VaR) and policy loss;
* :class:`riskfast.RiskPOLoss` - the same as one ``nn.Module`` for trainers;
* :func:`riskfast.build_info` - how the compiled extension was built.

``import riskfast`` imports neither TRL, verl nor diffusers.
"""

from . import riskpo
from ._extension import build_info
from .riskpo import RiskPOLoss

__version__ = "0.1.0"

__all__ = ["RiskPOLoss", "__version__", "build_info", "riskpo"]
