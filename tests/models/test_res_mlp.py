"""The residual MLP of the flow-matching toy experiments."""

import pytest
import torch

from diffusion_lab.models.res_mlp import ResMLP


def test_default_network_has_the_papers_396k_parameters_and_maps_shapes():
    net = ResMLP()
    # 2→128 (+128 bias), 1→128, 3 × (128→512→128), 128→2.
    expected = (2 * 128 + 128) + (128 + 128) + 3 * (128 * 512 + 512 + 512 * 128 + 128) + (128 * 2 + 2)
    assert sum(p.numel() for p in net.parameters()) == expected == 396_034
    assert net(torch.randn(5, 2), torch.rand(5) * 1000).shape == (5, 2)


def test_time_enters_through_a_linear_embedding_of_scaled_c_noise():
    net = ResMLP(time_scale=1e-3)
    x = torch.randn(4, 2)
    c = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    # Blocks are not linear, but the first layer is: h0(t) = W x + b + w_t·t + b_t; check it through a hook.
    seen = {}
    net.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0]))
    net(x, c)
    expected = net.inp(x) + net.time_emb(c[:, None] * 1e-3)
    torch.testing.assert_close(seen["h"], expected)


def test_labels_and_wrong_shapes_are_refused():
    net = ResMLP()
    with pytest.raises(ValueError, match="ResMLP is unconditional"):
        net(torch.randn(2, 2), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\), got \(2, 3\)"):
        net(torch.randn(2, 3), torch.rand(2))
