"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64():
    """Exactness claims are checked in float64; restored afterwards so other modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
