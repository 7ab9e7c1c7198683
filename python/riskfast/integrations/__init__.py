"""Optional integrations of RiskPO with training engines.

* :mod:`riskfast.integrations.trl` - ``RiskPOConfig`` / ``RiskPOTrainer``, drop-ins for
  TRL's ``GRPOConfig`` / ``GRPOTrainer`` (needs the ``trl`` extra);
* :mod:`riskfast.integrations.verl` - registers the advantage estimator ``"riskpo"``
  and the policy loss ``"riskpo"`` in verl (``VERL_USE_EXTERNAL_MODULES=
  riskfast.integrations.verl``).

Importing this package imports neither TRL nor verl; each submodule imports its
engine when it is itself imported.
"""

__all__: list[str] = []
