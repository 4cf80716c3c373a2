"""Auxiliary routing losses against hand-computed values."""

import math

import pytest
import torch

from meo_fairseq.modules import cv_loss, cv_squared, switch_loss, z_loss


@pytest.mark.parametrize("n", [2, 4, 16])
@pytest.mark.parametrize("mass", [1.0, 7.5])
def test_cv_squared_uniform_is_zero_and_collapsed_is_n(n, mass):
    assert cv_squared(torch.full((n,), mass / n)).item() == pytest.approx(0.0, abs=1e-12)
    collapsed = torch.zeros(n)
    collapsed[n // 2] = mass
    assert cv_squared(collapsed).item() == pytest.approx(n, rel=1e-6)


def test_cv_squared_hand_values():
    # [1, 2, 3]: unbiased var 1, mean 2 -> 1/4
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(0.25, rel=1e-6)
    # [0, 4]: var 8, mean 2 -> 2
    assert cv_squared(torch.tensor([0.0, 4.0])).item() == pytest.approx(2.0, rel=1e-6)
    assert cv_squared(torch.tensor([3.0])).item() == 0.0
    assert cv_squared(torch.zeros(5)).item() == 0.0  # no NaN for an all-zero vector


def test_cv_squared_is_fp32_for_half_inputs():
    v = cv_squared(torch.tensor([0.0, 0.0, 6e4], dtype=torch.float16))
    assert v.dtype == torch.float32 and v.item() == pytest.approx(3.0, rel=1e-4)


def test_cv_loss_is_importance_plus_load():
    # 3 groups, 4 experts, top-2
    gates = torch.tensor([[0.75, 0.25, 0.0, 0.0], [0.75, 0.0, 0.25, 0.0], [0.5, 0.0, 0.0, 0.5]])
    load = (gates > 0).float().sum(0)  # [3, 1, 1, 1]
    importance = [2.0, 0.25, 0.25, 0.5]
    m = sum(importance) / 4
    cv_imp = sum((v - m) ** 2 for v in importance) / 3 / m**2
    ml = 1.5
    cv_load = ((3 - ml) ** 2 + 3 * (1 - ml) ** 2) / 3 / ml**2
    assert cv_loss(gates, load).item() == pytest.approx(cv_imp + cv_load, rel=1e-6)
    # perfectly balanced: zero
    bal = torch.eye(4)
    assert cv_loss(bal, bal.sum(0)).item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("n", [2, 8])
def test_switch_loss_uniform_is_one_and_collapsed_is_n(n):
    g = 5
    logits = torch.zeros(g, n)
    gates = torch.zeros(g, n)
    gates[torch.arange(g), torch.arange(g) % n] = 1.0
    assert switch_loss(logits, gates).item() == pytest.approx(1.0, rel=1e-6)
    collapsed_logits = torch.full((g, n), -1e4)
    collapsed_logits[:, 1] = 1e4
    collapsed_gates = torch.zeros(g, n)
    collapsed_gates[:, 1] = 1.0
    assert switch_loss(collapsed_logits, collapsed_gates).item() == pytest.approx(n, rel=1e-6)


def test_switch_loss_hand_value():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    gates = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p1 = [math.e / (math.e + 2), 1 / (math.e + 2), 1 / (math.e + 2)]
    e2 = math.exp(2)
    p2 = [1 / (e2 + 2), e2 / (e2 + 2), 1 / (e2 + 2)]
    pm = [(a + b) / 2 for a, b in zip(p1, p2)]
    expected = 3 * (0.5 * pm[0] + 0.5 * pm[1])
    assert switch_loss(logits, gates).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_z_loss_of_zero_logits_is_log_n_squared(n):
    assert z_loss(torch.zeros(3, n)).item() == pytest.approx(math.log(n) ** 2, rel=1e-6, abs=1e-12)


def test_z_loss_hand_value_and_large_logits():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    expected = (math.log(4.0) ** 2 + (1 + math.log(2.0)) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    big = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.bfloat16)
    v = z_loss(big)
    assert torch.isfinite(v) and v.item() == pytest.approx(1e8, rel=1e-2)
