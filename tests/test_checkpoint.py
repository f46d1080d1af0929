"""pipeline.checkpoint's RNG state survives a resume on a machine with fewer GPUs visible."""

from __future__ import annotations

import torch

from pipeline import checkpoint


def fake_cuda(monkeypatch, visible: int, restored: list[int]) -> None:
    """torch.cuda as a machine with `visible` GPUs would behave, on a CPU: setting the RNG state of a device
    index that is not visible raises IndexError, as torch's default_generators[index] does."""
    state = torch.zeros(16, dtype=torch.uint8)

    def set_state(new_state: torch.Tensor, device: int | str = "cuda") -> None:
        index = 0 if isinstance(device, str) else int(device)
        if index >= visible:
            raise IndexError(f"CUDA device {index} of {visible}")
        restored.append(index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": state.clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [state.clone() for _ in range(visible)])
    for module in (torch.cuda, torch.cuda.random):
        monkeypatch.setattr(module, "set_rng_state", set_state)


def test_a_checkpoint_saved_with_two_gpus_resumes_with_one(monkeypatch):
    restored: list[int] = []
    fake_cuda(monkeypatch, 2, restored)
    saved = checkpoint.rng_state()
    fake_cuda(monkeypatch, 1, restored)
    checkpoint.set_rng_state(saved)
    assert restored == [0]


def test_the_global_cpu_generators_are_restored():
    saved = checkpoint.rng_state()
    first = torch.rand(3)
    checkpoint.set_rng_state(saved)
    assert torch.equal(torch.rand(3), first)
