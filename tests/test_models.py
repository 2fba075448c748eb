"""The UNet: shapes, conditioning, and its contract at initialisation."""

import pytest
import torch

from diffuse.config import ModelConfig
from diffuse.models import Dropout, GroupNorm32, UNet, attention, count_parameters, timestep_embedding


def cfg(**kw):
    base = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=4,
                head_channels=8, image_size=16, in_channels=1)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("channels,size", [(1, 16), (3, 16), (3, 32), (1, 28)])
def test_output_shape_matches_input(channels, size):
    attn = (size // 2,)
    net = UNet(cfg(in_channels=channels, image_size=size, attn_resolutions=attn))
    x = torch.randn(3, channels, size, size)
    assert net(x, torch.tensor([0.0, 500.0, 999.0])).shape == x.shape


def test_output_is_zero_at_init_and_learns_nonzero():
    net = UNet(cfg())
    x = torch.randn(2, 1, 16, 16)
    assert torch.count_nonzero(net(x, torch.tensor([1.0, 2.0]))) == 0   # zero-init output conv
    torch.nn.init.normal_(net.conv_out.weight)
    assert net(x, torch.tensor([1.0, 2.0])).abs().sum() > 0


def randomize_zero_init(net):
    """Give the zero-initialised layers (residual outputs, output conv) random weights, as
    training would, so conditioning paths reach the output."""
    with torch.no_grad():
        for p in net.parameters():
            if torch.count_nonzero(p) == 0 and p.ndim > 1:
                torch.nn.init.normal_(p, std=0.05)


def test_odd_class_count_and_null_class():
    net = UNet(cfg(class_cond=True, num_classes=7))
    randomize_zero_init(net)
    assert net.class_emb.num_embeddings == 8       # 7 classes + the null class
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10.0, 10.0])
    a = net(x, t, torch.tensor([0, 6]))
    null = net(x, t, torch.tensor([7, 7]))
    implicit = net(x, t, None)                     # no labels = the null class
    assert a.shape == x.shape
    assert torch.allclose(null, implicit)
    assert not torch.allclose(a, null)


def test_unconditional_rejects_labels():
    net = UNet(cfg())
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 16, 16), torch.tensor([1.0]), torch.tensor([0]))


def test_time_conditioning_changes_output():
    net = UNet(cfg())
    randomize_zero_init(net)
    x = torch.randn(1, 1, 16, 16)
    assert not torch.allclose(net(x, torch.tensor([1.0])), net(x, torch.tensor([900.0])))


def test_timestep_embedding_closed_form():
    e = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert e.shape == (2, 8)
    assert torch.allclose(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(e[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]), atol=1e-6)


def test_ddpm_cifar10_preset_has_paper_parameter_count():
    from diffuse.config import resolve
    c = resolve("cifar10-ddpm", None, None, {})
    c.model.image_size, c.model.in_channels = 32, 3
    n = count_parameters(UNet(c.model))
    assert abs(n - 35.7e6) < 0.1e6, n      # Ho et al. 2020: 35.7M


def test_grad_checkpointing_gives_the_same_gradients_with_dropout():
    torch.manual_seed(0)
    net = UNet(cfg(dropout=0.3, class_cond=True, num_classes=3))
    randomize_zero_init(net)
    net.train()
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([3.0, 200.0, 600.0, 999.0]), torch.tensor([0, 1, 2, 3])

    def grads(checkpointing: bool):
        net.grad_checkpointing = checkpointing
        net.zero_grad()
        torch.manual_seed(7)                       # the same dropout masks in both runs
        out = net(x, t, y)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    out_a, ga = grads(False)
    out_b, gb = grads(True)
    assert torch.equal(out_a, out_b)
    assert ga.keys() == gb.keys() and len(ga) == len(list(net.parameters()))
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-7, msg=n)
    # a different dropout seed changes the gradients: the comparison above can fail
    net.grad_checkpointing = False
    net.zero_grad()
    torch.manual_seed(8)
    net(x, t, y).square().mean().backward()
    assert not torch.allclose(net.conv_in.weight.grad, ga["conv_in.weight"])


# ----------------------------------------------------------------------------------------------
# The CPU fast paths: each must compute what the torch op it replaces computes.

def test_groupnorm32_matches_groupnorm_and_keeps_the_input_dtype():
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    gn = GroupNorm32(4, 16)
    gn.load_state_dict(ref.state_dict())                  # same parameters, same keys
    x = (torch.randn(3, 16, 8, 8) * 5 + 2).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gn(x), ref(x))
    xb = x.bfloat16()
    out = gn(xb)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    # statistics in float32: only the output rounding to bf16 (2^-8 relative) separates it from fp32
    torch.testing.assert_close(out.float(), ref(xb.float()), rtol=2**-7, atol=2**-7)


def test_dropout_keeps_1_minus_p_scaled_and_follows_the_torch_seed():
    x = torch.ones(16, 32, 16, 16).contiguous(memory_format=torch.channels_last)
    drop = Dropout(0.1).train()
    torch.manual_seed(3)
    a = drop(x)
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003                 # 131k draws: std 0.0008
    assert torch.allclose(a[kept], torch.tensor(1 / 0.9))
    assert a.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)                                      # same seed, same mask
    assert not torch.equal(drop(x), a)                                  # generator moved on
    # neighbours in memory (channels) are independent: no striping from the 4-per-draw packing
    k = kept.permute(0, 2, 3, 1).reshape(-1, 4).float()
    assert abs((k[:, 0] * k[:, 1]).mean().item() - 0.81) < 0.01
    assert torch.equal(drop.eval()(x), x)
    # the gradient is the mask times 1/(1-p)
    xg = torch.randn(2, 8, 4, 4, requires_grad=True)
    drop.train()
    y = drop(xg)
    y.sum().backward()
    torch.testing.assert_close(xg.grad, (y != 0).float() / 0.9)
    with pytest.raises(ValueError):
        Dropout(1.0)


@pytest.mark.parametrize("heads,tokens,d", [(2, 49, 32), (1, 256, 64), (4, 16, 8)])
def test_cpu_attention_matches_sdpa(heads, tokens, d):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, heads, tokens, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_patches_are_the_unshuffled_image_through_an_unpatched_unet():
    """--patch-size P: the network is pixel_unshuffle -> a UNet on C*P*P channels at 1/P of the size ->
    pixel_shuffle. Checked against that composition built by hand from an unpatched UNet carrying
    the same weights, so a wrong patch order or a missing shuffle at either end fails."""
    torch.manual_seed(0)
    patched = UNet(cfg(in_channels=3, image_size=32, patch_size=2, class_cond=True, num_classes=4))
    randomize_zero_init(patched)
    inner = UNet(cfg(in_channels=12, image_size=16, class_cond=True, num_classes=4))
    inner.load_state_dict(patched.state_dict())
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 700.0]), torch.tensor([1, 4])
    out = patched(x, t, y)
    assert out.shape == x.shape
    reference = torch.nn.functional.pixel_shuffle(inner(torch.nn.functional.pixel_unshuffle(x, 2), t, y), 2)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_a_patched_unet_costs_what_the_unpatched_one_costs_at_a_patch_of_the_size():
    """The config help's claim: a 64 px image at the cost of 32 px (counted FLOPs of one forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(**kw) -> int:
        net = UNet(cfg(base_channels=16, channel_mult=(1, 2, 2), attn_resolutions=(8,), in_channels=3, **kw))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            net(torch.randn(1, 3, net.cfg.image_size, net.cfg.image_size), torch.tensor([3.0]))
        return counter.get_total_flops()

    full, patched, half = flops(image_size=64), flops(image_size=64, patch_size=2), flops(image_size=32)
    assert patched / half == pytest.approx(1.0, abs=0.05)         # only conv_in/conv_out see 12 channels
    assert full / patched > 3.5                                  # a quarter of the positions at every level


def test_bad_patch_sizes_are_one_line_errors():
    from diffuse.config import Config, validate, validate_resolution
    from diffuse.errors import DiffuseError
    c = Config()
    c.model.patch_size = 0
    with pytest.raises(DiffuseError, match="--patch-size must be between 1 and 8, got 0"):
        validate(c)
    with pytest.raises(DiffuseError, match=r"image size 36 is not divisible by 8 \(needed by 3 UNet levels and 2x2 patches\)"):
        validate_resolution(cfg(channel_mult=(1, 2, 2), attn_resolutions=(), image_size=36, patch_size=2))
    with pytest.raises(DiffuseError, match="--attn-resolutions 32 not among this UNet's feature sizes 16,8"):
        validate_resolution(cfg(attn_resolutions=(32,), image_size=32, patch_size=2))
