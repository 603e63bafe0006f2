"""The official sigma schedules, and the solvers' steps against diffusers' implementations."""

import numpy as np
import pytest
import torch

from wan_i2v.errors import WanError
from wan_i2v.sampling.schedulers import make_solver, official_schedule


def shifted(sigma, shift):
    return shift * sigma / (1 + (shift - 1) * sigma)


@pytest.mark.parametrize("steps,shift", [(40, 5.0), (40, 3.0), (7, 5.0)])
def test_unipc_schedule_is_official(steps, shift):
    # Official FlowUniPCMultistepScheduler: a 1000-entry training table sigma = 1 - linspace(1, 1/1000)
    # reversed, held in float32, so sigma_max = float32(0.999) and sigma_min = 0; then
    # linspace(sigma_max, sigma_min, steps + 1)[:-1], shifted; timesteps = int64(sigma * 1000).
    sigma_max = float(np.float32(0.999))
    sigmas = [shifted(sigma_max * (1 - i / steps), shift) for i in range(steps)]
    schedule = official_schedule("unipc", steps, shift)
    assert schedule.timesteps.tolist() == [int(s * 1000) for s in sigmas]
    assert schedule.sigmas.dtype == torch.float32
    assert torch.allclose(schedule.sigmas, torch.tensor(sigmas + [0.0]), rtol=0, atol=1e-7)


def test_unipc_schedule_known_values():
    # 40 steps, shift 5: sigma_0 = 5*0.999/(1+4*0.999) = 0.99980, so t_0 = 999. The high-noise expert
    # runs while t >= 900, i.e. 5s/(1+4s) >= 0.9 <=> s >= 0.9/1.4 = 0.642857; with s_i = 0.999(1 - i/40)
    # that is i <= 40(1 - 0.642857/0.999) = 14.26: steps 0..14, fifteen of them.
    timesteps = official_schedule("unipc", 40, 5.0).timesteps.tolist()
    assert timesteps[0] == 999
    assert sum(t >= 900 for t in timesteps) == 15
    assert timesteps[14] >= 900 > timesteps[15]


def test_dpm_schedule_is_official():
    # Official get_sampling_sigmas: linspace(1, 0, steps + 1)[:steps], shifted; the first timestep is 1000.
    steps, shift = 10, 5.0
    sigmas = [shifted(1 - i / steps, shift) for i in range(steps)]
    schedule = official_schedule("dpm++", steps, shift)
    assert schedule.timesteps.tolist() == [int(s * 1000) for s in sigmas]
    assert schedule.timesteps[0] == 1000
    assert torch.allclose(schedule.sigmas, torch.tensor(sigmas + [0.0]), rtol=0, atol=1e-7)


def test_unknown_solver():
    with pytest.raises(WanError, match="unknown solver 'heun'"):
        official_schedule("heun", 10, 5.0)


def toy_flow(x, sigma):
    """A smooth, nonlinear stand-in for the model: higher-order solver terms all matter."""
    return torch.tanh(x) * (1 + sigma) + 0.3 * torch.sin(3 * x) - 0.5


def diffusers_reference(solver, schedule):
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, solver_order=2, lower_order_final=True, final_sigmas_type="zero")
    if solver == "unipc":
        reference = UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, **common)
    else:
        reference = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
    reference.set_timesteps(len(schedule.timesteps))
    # Same algorithm, the official schedule.
    reference.sigmas = schedule.sigmas.clone()
    reference.timesteps = schedule.timesteps.clone()
    return reference


@pytest.mark.parametrize("solver,steps", [("unipc", 12), ("unipc", 40), ("dpm++", 12), ("dpm++", 40)])
def test_solver_matches_diffusers(solver, steps):
    schedule = official_schedule(solver, steps, 5.0)
    ours = make_solver(solver, schedule)
    reference = diffusers_reference(solver, schedule)
    x = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    for i, t in enumerate(schedule.timesteps):
        sigma = schedule.sigmas[i].item()
        x = ours.step(toy_flow(x, sigma), x)
        y = reference.step(toy_flow(y, sigma), t, y, return_dict=False)[0]
    assert torch.isfinite(x).all()
    assert ((x - y).norm() / y.norm()).item() < 1e-5


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
def test_exact_flow_recovers_the_data(solver):
    # For x_t = (1 - s) x0 + s n the true flow is n - x0; every solver step is then exact.
    schedule = official_schedule(solver, 8, 3.0)
    x0, noise = torch.randn(2, 6), torch.randn(2, 6)
    stepper = make_solver(solver, schedule)
    x = (1 - schedule.sigmas[0]) * x0 + schedule.sigmas[0] * noise
    for _ in schedule.timesteps:
        x = stepper.step(noise - x0, x)
    assert torch.allclose(x, x0, atol=1e-5)


def test_euler_is_the_distilled_models_schedule():
    """N = 4, shift 5: s = 1, .75, .5, .25; sigma = 5s / (1 + 4s); the model sees 1000 sigma, unrounded."""
    schedule = official_schedule("euler", 4, 5.0)
    assert schedule.timesteps.tolist() == pytest.approx([1000.0, 937.5, 833.3333333333334, 625.0], abs=1e-9)
    assert schedule.sigmas.tolist() == pytest.approx([1.0, 0.9375, 0.8333333333333334, 0.625, 0.0], abs=1e-12)
    # The high-noise expert while t >= 900: the first two steps (lightx2v's boundary_step_index 2).
    assert [t >= 900 for t in schedule.timesteps.tolist()] == [True, True, False, False]
    solver = make_solver("euler", schedule)
    x, v = torch.ones(3), torch.full((3,), 2.0)
    for sigma, next_sigma in zip([1.0, 0.9375, 0.8333333333333334, 0.625], [0.9375, 0.8333333333333334, 0.625, 0.0]):
        expected = x + (next_sigma - sigma) * v
        x = solver.step(v, x)
        assert torch.allclose(x, expected, atol=1e-12)
    assert torch.allclose(x, torch.full((3,), 1.0 - 2.0), atol=1e-6)  # from sigma 1 to 0 along a constant v
