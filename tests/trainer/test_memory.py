"""The trainer's memory metrics (trainer/memory.py) see what a phase allocates and what it keeps."""

import pytest
import torch

from megatron_rl.trainer.memory import GIB, cpu_peak_supported, phase_peak, state_bytes


@pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs and VmHWM")
def test_phase_peak_sees_a_transient_allocation_and_not_what_lived_before():
    kept = torch.ones(32 << 20, dtype=torch.uint8)  # 32 MiB alive before the phase: not its own
    quiet: dict[str, float] = {}
    with phase_peak("quiet", quiet):
        pass
    busy: dict[str, float] = {}
    with phase_peak("busy", busy):
        tmp = torch.ones(96 << 20, dtype=torch.uint8)  # 96 MiB, touched, then freed
        del tmp
    assert quiet["mem/quiet_rss_rise_gib"] * GIB < 16 << 20
    assert 90 << 20 < busy["mem/busy_rss_rise_gib"] * GIB < 140 << 20
    assert busy["mem/rss_gib"] * GIB > kept.numel()


def test_state_bytes_counts_parameters_grads_and_adam_state_once():
    model = torch.nn.Linear(256, 512)  # 131,584 fp32 parameters
    shared = torch.nn.Linear(256, 512)
    shared.weight = model.weight  # a tied weight is one storage
    opt = torch.optim.AdamW(list(model.parameters()) + [shared.bias], lr=1e-3)
    params = sum(p.numel() for p in model.parameters()) + shared.bias.numel()
    assert state_bytes([model, shared], opt) == 4 * params  # no grads, no Adam state yet
    (model(torch.ones(2, 256)).sum() + shared(torch.ones(2, 256)).sum()).backward()
    opt.step()
    # params + grads + exp_avg + exp_avg_sq (fp32), plus Adam's scalar step counters
    assert state_bytes([model, shared], opt) == 16 * params + 4 * 3
