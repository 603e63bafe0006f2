"""Flow-matching solvers with the official Wan2.2 sigma schedules: UniPC (bh2) and DPM-Solver++(2M).

The official code builds its schedules in float64 with numpy, keeps sigmas as a
float32 tensor on the host, feeds the model integer timesteps (``int(sigma*1000)``)
and computes every solver coefficient in float32 on the host. We do the same, so
the coefficients are the official ones to the bit and nothing here touches the GPU
but the two or three fused multiply-adds on the latents per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wan_i2v.config import SOLVERS
from wan_i2v.errors import WanError

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class Schedule:
    sigmas: torch.Tensor  # [steps + 1], the last one 0: float32 (the official solvers), float64 (euler)
    timesteps: torch.Tensor  # [steps], what the model sees: int64 (the official solvers), float64 (euler)


def official_schedule(solver: str, steps: int, shift: float) -> Schedule:
    if solver == "unipc":
        # The UniPC scheduler derives its range from a 1000-step training table
        # held in float32: sigma_max = float32(0.999), sigma_min = 0.
        sigma_max = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
        sigmas = shift_sigmas(np.linspace(sigma_max, 0.0, steps + 1)[:-1], shift)
    elif solver == "dpm++":
        sigmas = shift_sigmas(np.linspace(1.0, 0.0, steps + 1)[:steps], shift)
    elif solver == "euler":
        # The distilled models' schedule (lightx2v's): s_i = 1 - i/N, and the model sees the
        # shifted sigma times 1000 unrounded (1000, 937.5, 833.33, 625 for 4 steps at shift 5).
        sigmas = shift_sigmas(1.0 - np.arange(steps) / steps, shift)
        return Schedule(torch.from_numpy(np.append(sigmas, 0.0)), torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS))
    else:
        raise WanError(f"unknown solver {solver!r}", f"choose one of {', '.join(SOLVERS)}")
    timesteps = torch.from_numpy(sigmas * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    return Schedule(torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32)), timesteps)


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha) - log(sigma) with alpha = 1 - sigma (flow matching)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class FlowSolver:
    """Multistep solver state over one schedule. ``step`` maps (flow, x_t) to x_{t-1}."""

    def __init__(self, schedule: Schedule):
        self.sigmas = schedule.sigmas
        self.num_steps = len(schedule.timesteps)
        self.step_index = 0
        self.history: list[torch.Tensor] = []  # data predictions x0, newest last

    def _predict_x0(self, flow, sample):
        return sample - self.sigmas[self.step_index].item() * flow

    def state_dict(self) -> dict:
        return {"step_index": self.step_index, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.step_index = state["step_index"]
        self.history = list(state["history"])


class FlowUniPC(FlowSolver):
    """UniPC with B(h) = expm1(h) (bh2), order 2, corrector on, lower order at the end: the official settings."""

    order = 2

    def __init__(self, schedule: Schedule):
        super().__init__(schedule)
        self.last_sample: torch.Tensor | None = None
        self.last_order = 0

    def step(self, flow: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        x0 = self._predict_x0(flow, sample)
        if self.step_index > 0:
            sample = self._correct(x0, sample)
        self.history = (self.history + [x0])[-self.order :]
        self.last_order = min(self.order, self.num_steps - self.step_index, self.step_index + 1)
        self.last_sample = sample
        out = self._predict(sample)
        self.step_index += 1
        return out

    def _coefficients(self, target: int, source: int, order: int):
        """h, the predictor/corrector terms at ``target`` from ``source`` and the r_k of older points."""
        sig = self.sigmas
        lambda_s0 = _log_snr(sig[source])
        h = _log_snr(sig[target]) - lambda_s0
        rks = [(_log_snr(sig[source - i]) - lambda_s0) / h for i in range(1, order)]
        hh = -h
        h_phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        rows, b = [], []
        rk_all = torch.tensor([*(r.item() for r in rks), 1.0])
        for i in range(1, order + 1):
            rows.append(torch.pow(rk_all, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        alpha_t, sigma_t, sigma_s0 = 1 - sig[target], sig[target], sig[source]
        base = ((sigma_t / sigma_s0).item(), (alpha_t * h_phi_1).item())
        return base, (alpha_t * b_h).item(), rks, torch.stack(rows), torch.stack(b)

    def _predict(self, sample):
        i, order = self.step_index, self.last_order
        (ratio, x0_coef), res_coef, rks, _, _ = self._coefficients(i + 1, i, order)
        m0 = self.history[-1]
        out = ratio * sample - x0_coef * m0
        if order == 2:
            # The official predictor fixes rho = 0.5 at order 2.
            out = out - res_coef * (0.5 * ((self.history[-2] - m0) / rks[0].item()))
        return out

    def _correct(self, x0, sample):
        i, order = self.step_index, self.last_order
        (ratio, x0_coef), res_coef, rks, rows, b = self._coefficients(i, i - 1, order)
        m0 = self.history[-1]
        rhos = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(rows, b)
        out = ratio * self.last_sample - x0_coef * m0
        correction = rhos[-1].item() * (x0 - m0)
        if order == 2:
            correction = correction + rhos[0].item() * ((self.history[-2] - m0) / rks[0].item())
        return out - res_coef * correction

    def state_dict(self) -> dict:
        return {**super().state_dict(), "last_sample": self.last_sample, "last_order": self.last_order}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.last_sample, self.last_order = state["last_sample"], state["last_order"]


class FlowDPMPlusPlus(FlowSolver):
    """DPM-Solver++(2M), midpoint, first order at the first and the last step: the official settings."""

    def step(self, flow: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i, sig = self.step_index, self.sigmas
        x0 = self._predict_x0(flow, sample)
        self.history = (self.history + [x0])[-2:]
        lambda_t, lambda_s0 = _log_snr(sig[i + 1]), _log_snr(sig[i])
        h = lambda_t - lambda_s0
        alpha_t = 1 - sig[i + 1]
        ratio = (sig[i + 1] / sig[i]).item()
        x0_coef = (alpha_t * (torch.exp(-h) - 1.0)).item()
        out = ratio * sample - x0_coef * x0
        if i > 0 and i < self.num_steps - 1:
            r0 = (lambda_s0 - _log_snr(sig[i - 1])) / h
            d1 = (1.0 / r0).item() * (x0 - self.history[0])
            out = out - (0.5 * x0_coef) * d1
        self.step_index += 1
        return out


class FlowEuler(FlowSolver):
    """First-order flow matching, as the distilled models were trained to be sampled:
    x <- x + (sigma_{i+1} - sigma_i) * v, the step from the float64 schedule."""

    def step(self, flow: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self.step_index
        self.step_index += 1
        return sample + (self.sigmas[i + 1] - self.sigmas[i]).item() * flow


def make_solver(name: str, schedule: Schedule) -> FlowSolver:
    return {"unipc": FlowUniPC, "dpm++": FlowDPMPlusPlus, "euler": FlowEuler}[name](schedule)
