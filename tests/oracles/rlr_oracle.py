"""Loop-based float64 oracles of the denoising step: written from the papers, not the code.

No torch and no riskfast import: plain Python floats and lists, one element at a time.

* DDIM (Song, Meng and Ermon 2021, eq. 12): with ``a_t`` the cumulative alpha-bar,
  ``x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z``,
  ``s = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)``.
* DDPM (Ho, Jain and Abbeel 2020, eq. 7): the posterior mean
  ``sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t``
  with ``alpha_t = a_t / a_prev``, ``beta_t = 1 - alpha_t``, and variance
  ``(1 - a_prev) / (1 - a_t) beta_t`` ("fixed_small") or ``beta_t`` ("fixed_large").
* The Gaussian log-density ``sum_i [-(x_i - m_i)^2 / (2 s^2) - log s - log(2 pi) / 2]``.
"""

from __future__ import annotations

import math


def original_and_noise(x_t, out, a_t, prediction_type):
    """Per element: the predicted x0 and noise from the model output ``out``."""
    x0, eps = [], []
    for x, m in zip(x_t, out):
        if prediction_type == "epsilon":
            x0.append((x - math.sqrt(1 - a_t) * m) / math.sqrt(a_t))
            eps.append(m)
        elif prediction_type == "sample":
            x0.append(m)
            eps.append((x - math.sqrt(a_t) * m) / math.sqrt(1 - a_t))
        elif prediction_type == "v_prediction":
            x0.append(math.sqrt(a_t) * x - math.sqrt(1 - a_t) * m)
            eps.append(math.sqrt(a_t) * m + math.sqrt(1 - a_t) * x)
        else:
            raise ValueError(prediction_type)
    return x0, eps


def ddim_step(x_t, out, a_t, a_prev, eta, prediction_type="epsilon", clip=None):
    """``(mean, s)`` of the DDIM step from ``x_t`` (lists of floats)."""
    x0, eps = original_and_noise(x_t, out, a_t, prediction_type)
    if clip is not None:
        x0 = [min(max(v, -clip), clip) for v in x0]
    s = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    direction = math.sqrt(max(1 - a_prev - s * s, 0.0))
    mean = [math.sqrt(a_prev) * o + direction * e for o, e in zip(x0, eps)]
    return mean, s


def ddpm_step(x_t, out, a_t, a_prev, prediction_type="epsilon", clip=None, variance="fixed_small"):
    """``(mean, s)`` of the DDPM ancestral step from ``x_t`` (lists of floats)."""
    x0, _ = original_and_noise(x_t, out, a_t, prediction_type)
    if clip is not None:
        x0 = [min(max(v, -clip), clip) for v in x0]
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    c_x0 = math.sqrt(a_prev) * beta_t / (1 - a_t)
    c_xt = math.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t)
    mean = [c_x0 * o + c_xt * x for o, x in zip(x0, x_t)]
    var = (1 - a_prev) / (1 - a_t) * beta_t if variance == "fixed_small" else beta_t
    return mean, math.sqrt(max(var, 1e-20))


def gaussian_log_density(x, mean, s):
    """``log N(x; mean, s^2 I)`` summed over the elements."""
    total = 0.0
    for xi, mi in zip(x, mean):
        total += -((xi - mi) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)
    return total
