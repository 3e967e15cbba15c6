"""Shared test set-up: sgdbreak's Hypothesis profiles (no deadlines: torch calls are slow to warm up)."""

import os
import signal

import pytest
import torch
from hypothesis import HealthCheck, settings

from sgdbreak.testing.strategies import register_profiles

# The kit's profiles, plus function-scoped fixtures (monkeypatch, tmp_path) in @given tests.
register_profiles(max_examples=25)
settings.register_profile(
    "default",
    parent=settings.get_profile("sgdbreak"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def sigkill_when_ready():
    """Kill a child with SIGKILL once it prints "ready" (a crash mid-write), and reap it."""

    def kill(proc):
        try:
            assert proc.stdout.readline().strip() == "ready"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()

    return kill
