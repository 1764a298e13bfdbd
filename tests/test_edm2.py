"""Our EDM2 network on the official snapshot fixtures: strict loading, the public code's outputs, guided Heun
samples of both EDM2 guidance pairs (CFG with the unconditional net, autoguidance with the weaker net), every
guidance method and REG mode through the one guidance path, and the errors for mismatched networks."""

from pathlib import Path

import pytest
import torch

from lightning_reg.diffusion.denoiser import Denoiser
from lightning_reg.diffusion.samplers import edm_heun
from lightning_reg.errors import ConfigError
from lightning_reg.guidance import GuidedDenoiser, make_guidance
from lightning_reg.guidance.methods import GUIDANCE
from lightning_reg.models.edm2 import (EDM2_SIZES, EDM2Denoiser, EDM2Precond, edm2_denoiser_parts, edm2_img512_config,
                                       load_edm2, load_edm2_state_dict, mp_cat, mp_silu, mp_sum, normalize)
from lightning_reg.sources.edm2 import convert_edm2

FIXTURES = Path(__file__).parent / "fixtures"
NETS = ("main", "guide", "uncond")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "edm2_official_tiny.pt", weights_only=True)


def load(name: str) -> EDM2Precond:
    return load_edm2(FIXTURES / f"edm2_official_tiny_{name}.pkl")[0]


@pytest.fixture(scope="module")
def stored_nets():
    """The three fixture networks, as loaded from their files."""
    return {name: load(name) for name in NETS}


def relative_error(out, ref) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


# ------------------------------------------------------------------------------------------ pieces
def test_magnitude_preserving_operations_keep_unit_magnitude():
    torch.manual_seed(0)
    a, b = torch.randn(4, 64, 16, 16), torch.randn(4, 32, 16, 16)
    assert abs(float(mp_silu(torch.randn(10 ** 6)).square().mean()) - 1) < 0.01
    assert abs(float(mp_sum(a, torch.randn_like(a), 0.3).square().mean()) - 1) < 0.02
    cat = mp_cat(a, b, 0.5)
    assert cat.shape == (4, 96, 16, 16) and abs(float(cat.square().mean()) - 1) < 0.02
    w = normalize(torch.randn(8, 5, 3, 3) * 7)
    torch.testing.assert_close(w.flatten(1).square().mean(1), torch.ones(8), rtol=1e-3, atol=0)


@pytest.mark.parametrize("size,millions", [("xs", 125), ("s", 280), ("m", 498), ("l", 777), ("xl", 1119),
                                           ("xxl", 1523)])
def test_img512_presets_have_the_published_sizes(size, millions):
    with torch.device("meta"):
        net = EDM2Precond(**edm2_img512_config(size))
    assert round(sum(p.numel() for p in net.parameters()) / 1e6) == millions  # EDM2 paper, Table 2
    assert net.data_shape == (4, 64, 64) and net.num_classes == 1000
    assert net.unet.enc["64x64_conv"].weight.shape == (EDM2_SIZES[size], 5, 3, 3)
    assert [k for k in net.unet.dec if k.startswith("8x8")] == ["8x8_in0", "8x8_in1", *[f"8x8_block{i}" for i in range(4)]]


def test_unknown_constructor_argument_is_refused():
    with pytest.raises(ConfigError, match=r"unknown EDM2 network arguments \['model_chanels'\]"):
        EDM2Precond(8, 4, 10, model_chanels=16)


# -------------------------------------------------------------------------------- official weights
@pytest.mark.parametrize("name", NETS)
def test_official_state_dicts_load_strictly(name, expected):
    net, snapshot = load_edm2(FIXTURES / f"edm2_official_tiny_{name}.pkl")
    assert list(net.state_dict()) == list(snapshot.state_dict)  # same names, same order
    assert all(torch.equal(net.state_dict()[k], v) and v.dtype == torch.float16 for k, v in snapshot.state_dict.items())
    assert net.num_classes == expected["config"][name]["label_dim"] and net.data_shape == (4, 8, 8)


def test_strict_load_names_missing_unexpected_and_misshaped_tensors():
    net = load("guide")
    state = dict(net.state_dict())
    state.pop("unet.out_gain")
    state["unet.extra.weight"] = torch.zeros(1)
    state["unet.out_conv.weight"] = torch.zeros(4, 9, 3, 3)
    with pytest.raises(ConfigError) as err:
        load_edm2_state_dict(EDM2Precond(8, 4, 10, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                                         attn_resolutions=[4], channels_per_head=8, logvar_channels=16), state, "x.pkl")
    message = str(err.value)
    assert "\n" not in message and "x.pkl does not fit the EDM2 network: missing: unet.out_gain" in message
    assert "unexpected: unet.extra.weight" in message
    assert "shapes: unet.out_conv.weight (4, 9, 3, 3) (needs (4, 8, 3, 3))" in message


@pytest.mark.parametrize("name", NETS)
def test_outputs_match_the_public_code(name, expected):
    net = load(name)
    denoiser = Denoiser(net, *edm2_denoiser_parts(net))
    with torch.no_grad():
        out = denoiser(expected["x"], expected["sigma"], expected["class_labels"])
        logvar = net.logvar(expected["sigma"])
    assert out.dtype == torch.float32 and out.shape == (6, 4, 8, 8)
    for row in range(6):  # every noise level, 80 down to 0.002
        assert relative_error(out[row], expected["out"][name][row]) < 1e-5
    assert relative_error(logvar, expected["logvar"][name]) < 1e-5


def test_gains_scale_in_their_stored_dtype_as_the_public_code_does(expected):
    """``gain / sqrt(fan_in)`` rounds in float16 for the stored gains: the same weights held in float32
    miss the public outputs by that rounding (about 2^-12 relative per gain)."""
    net = load("main").float()
    with torch.no_grad():
        out = Denoiser(net, *edm2_denoiser_parts(net))(expected["x"], expected["sigma"], expected["class_labels"])
    assert 1e-4 < relative_error(out, expected["out"]["main"]) < 2e-3


# ---------------------------------------------------------------------------------------- guidance
def pair(nets, kind: str, scale: float, **kwargs):
    """EDM2's guidance pairs through our guidance: CFG's reference is the unconditional net, autoguidance's the
    weaker conditional net, each an ordinary guidance reference given the same labels."""
    if kind == "cfg":
        return EDM2Denoiser(nets["main"]), make_guidance("cfg", scale=scale, convention="w2",
                                                         reference=EDM2Denoiser(nets["uncond"]), **kwargs)
    return EDM2Denoiser(nets["main"]), make_guidance("autoguidance", scale=scale, convention="w2",
                                                     reference=EDM2Denoiser(nets["guide"]), **kwargs)


@pytest.mark.parametrize("kind", ["autoguidance", "cfg"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_heun_matches_the_public_sampler(kind, scale, expected, stored_nets):
    denoiser, guidance = pair(stored_nets, kind, scale)
    out = edm_heun(GuidedDenoiser(denoiser, guidance, expected["sample_labels"]), expected["noise"],
                   denoiser.schedule, expected["num_steps"])
    assert (out - expected["sampled"][(kind, scale)]).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["autoguidance", "cfg"])
def test_guided_estimate_is_edm2s_lerp(kind, stored_nets, expected):
    denoiser, guidance = pair(stored_nets, kind, 2.4)
    x, y, sigma = expected["x"][:3], expected["sample_labels"], torch.tensor(1.3)
    main = Denoiser(stored_nets["main"], *edm2_denoiser_parts(stored_nets["main"]))
    ref_net = stored_nets["uncond" if kind == "cfg" else "guide"]
    with torch.no_grad():
        d, d_ref = main(x, sigma, y), Denoiser(ref_net, *edm2_denoiser_parts(ref_net))(x, sigma, y)
        guided = GuidedDenoiser(denoiser, guidance, y)(x, sigma)
    torch.testing.assert_close(guided, d_ref.lerp(d, 2.4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cfg", "autoguidance"])
@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_reg_differentiates_the_main_network_only(kind, reg, stored_nets, expected):
    denoiser, guidance = pair(stored_nets, kind, 2.0, reg=reg)
    ref_net = stored_nets["uncond" if kind == "cfg" else "guide"]
    grad_calls = []
    hook = ref_net.register_forward_hook(lambda *a: grad_calls.append(torch.is_grad_enabled()))
    x, y, sigma = expected["x"][:3], expected["sample_labels"], torch.tensor(2.0)
    try:
        guided = GuidedDenoiser(denoiser, guidance, y)(x, sigma)
    finally:
        hook.remove()
    assert grad_calls == [False]  # the reference ran once, outside any graph
    main = Denoiser(stored_nets["main"], *edm2_denoiser_parts(stored_nets["main"]))
    with torch.no_grad():
        g = main(x, sigma, y) - Denoiser(ref_net, *edm2_denoiser_parts(ref_net))(x, sigma, y)  # w = 1
    x_in = x.clone().requires_grad_(True)
    x0_c = main(x_in, sigma, y)
    factor = torch.autograd.grad(x0_c.sum() if reg == "paper" else x0_c, x_in, None if reg == "paper" else g)[0]
    expected_x0 = x0_c.detach() + (factor * g if reg == "paper" else factor)
    torch.testing.assert_close(guided, expected_x0, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for net in stored_nets.values() for p in net.parameters())


METHOD_PARAMS = {"interval": dict(scale=1.5, t_lo=0.28, t_hi=2.90), "cfgpp": dict(scale=0.6, convention="w2"),
                 "cfg_zero_star": dict(scale=1.5, zero_init_steps=0)}  # CFG-Zero*'s zeroed first step: no term


@pytest.mark.parametrize("method", sorted(set(GUIDANCE) - {"conditional", "autoguidance"}))
@pytest.mark.parametrize("reg", ["paper", "vjp"])
def test_every_method_and_reg_mode_on_both_pairs_is_reg_by_autograd(method, reg, stored_nets, expected):
    """Each method with CFG's reference (the unconditional net) and with autoguidance's (the weaker net, same
    labels), at two sigmas of one chain: REG's estimate is ``x0_c + J^T 1 ⊙ g`` (paper) or ``x0_c + J^T g`` (vjp),
    with ``g`` the plain method's term at the same call (EDM: ``a_t = 1``) and ``J`` by autograd on the main net;
    the two pairs guide differently."""
    x, y = expected["x"][:2], expected["sample_labels"][:2]
    params = METHOD_PARAMS.get(method, dict(scale=1.5))
    main = Denoiser(stored_nets["main"], *edm2_denoiser_parts(stored_nets["main"]))
    plain_outs = {}
    for kind, reference in (("cfg", EDM2Denoiser(stored_nets["uncond"])),
                            ("autoguidance", EDM2Denoiser(stored_nets["guide"]))):
        denoiser = EDM2Denoiser(stored_nets["main"])
        rectified, plain = (GuidedDenoiser(denoiser, make_guidance(method, reg=mode, reference=reference, **params), y)
                            for mode in (reg, "none"))
        for sigma in (torch.tensor(2.0), torch.tensor(1.0)):
            out, plain_out = rectified(x, sigma), plain(x, sigma)
            x_in = x.clone().requires_grad_(True)
            x0_c = main(x_in, sigma, y)
            g = plain_out - x0_c.detach()
            factor = torch.autograd.grad(x0_c.sum() if reg == "paper" else x0_c, x_in,
                                         None if reg == "paper" else g)[0]
            torch.testing.assert_close(out, x0_c.detach() + (factor * g if reg == "paper" else factor),
                                       rtol=1e-4, atol=1e-5)
            assert g.abs().max() > 1e-3
            plain_outs[kind, float(sigma)] = plain_out
    assert (plain_outs["cfg", 2.0] - plain_outs["autoguidance", 2.0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- errors
def tiny(label_dim: int = 10, resolution: int = 8, channels: int = 4) -> EDM2Precond:
    return EDM2Precond(resolution, channels, label_dim, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                       attn_resolutions=[4], channels_per_head=8, logvar_channels=16)


def test_mismatched_networks_are_one_line(stored_nets):
    main, uncond = stored_nets["main"], stored_nets["uncond"]
    cases = [
        (lambda: GuidedDenoiser(EDM2Denoiser(main), make_guidance(
            "cfg", reference=EDM2Denoiser(tiny(0, resolution=16))), torch.tensor([1])),
         "reference has num_classes=0, data_shape=(4, 16, 16); the model has num_classes=10, data_shape=(4, 8, 8)"),
        (lambda: GuidedDenoiser(EDM2Denoiser(main), make_guidance(
            "cfg", reference=EDM2Denoiser(tiny(0, channels=3))), torch.tensor([1])), "data_shape=(3, 8, 8)"),
        (lambda: GuidedDenoiser(EDM2Denoiser(main), make_guidance(
            "autoguidance", reference=EDM2Denoiser(tiny(resolution=16))), torch.tensor([1])),
         "data_shape=(4, 16, 16); the model has num_classes=10, data_shape=(4, 8, 8)"),
        (lambda: GuidedDenoiser(EDM2Denoiser(main), make_guidance(
            "autoguidance", reference=EDM2Denoiser(tiny(channels=3))), torch.tensor([1])), "data_shape=(3, 8, 8)"),
        (lambda: GuidedDenoiser(EDM2Denoiser(main), make_guidance("cfg", scale=1.0), torch.tensor([1])),
         "EDM2Precond was trained without a null condition"),
        (lambda: GuidedDenoiser(EDM2Denoiser(main), make_guidance("cfg", reference=EDM2Denoiser(uncond)),
                                torch.tensor([10])), "label ids must lie in [0, 9]"),
    ]
    for build, message in cases:
        with pytest.raises(ConfigError) as err:
            build()
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_dit_file_and_a_truncated_file_given_as_edm2(tmp_path):
    truncated = tmp_path / "edm2-img512-s.pkl"
    truncated.write_bytes((FIXTURES / "edm2_official_tiny_main.pkl").read_bytes()[:-100])
    for path, message in ((FIXTURES / "dit_official_tiny.pt", "is a zip file (a torch.save checkpoint"),
                          (truncated, "is not a readable EDM2 snapshot")):
        with pytest.raises(ConfigError) as err:
            load_edm2(path)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_convert_once_to_safetensors_then_load_without_pickle(tmp_path, expected, monkeypatch):
    pkl = tmp_path / "edm2-img512-tiny.pkl"
    pkl.write_bytes((FIXTURES / "edm2_official_tiny_main.pkl").read_bytes())
    written = convert_edm2(pkl)
    assert written == tmp_path / "edm2-img512-tiny.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edm2-img512-tiny.pkl", "edm2-img512-tiny.safetensors"]
    net_pkl, snap_pkl = load_edm2(pkl)
    def no_pickle(*args, **kwargs):
        raise AssertionError("the safetensors load read a pickle")

    for name in ("read_edm2_pickle", "safe_load", "SafeUnpickler"):
        monkeypatch.setattr(f"lightning_reg.io.edm2_pickle.{name}", no_pickle)
    monkeypatch.setattr("lightning_reg.io.edm2.read_edm2_pickle", no_pickle)
    net, snapshot = load_edm2(written)
    assert snapshot.init_kwargs == expected["config"]["main"] and snapshot.encoder == "StabilityVAEEncoder"
    assert snapshot.loss_kwargs == snap_pkl.loss_kwargs and snapshot.latent_scale.tolist() == snap_pkl.latent_scale.tolist()
    assert all(torch.equal(v, snap_pkl.state_dict[k]) and v.dtype == torch.float16 for k, v in snapshot.state_dict.items())
    with torch.no_grad():
        x, s, y = expected["x"], expected["sigma"], expected["class_labels"]
        assert torch.equal(EDM2Denoiser(net)(x, s, y), EDM2Denoiser(net_pkl)(x, s, y))


def test_convert_refuses_bad_files_and_writes_nothing(tmp_path):
    for name, data in (("cut.pkl", (FIXTURES / "edm2_official_tiny_guide.pkl").read_bytes()[:30_000]),
                       ("dit.pkl", (FIXTURES / "dit_official_tiny.pt").read_bytes())):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError):
            convert_edm2(tmp_path / name)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="is not an EDM2 safetensors file"):
        load_edm2(tmp_path / "bad.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "cut.pkl", "dit.pkl"]


def test_bf16_autocast_runs_close_to_float32(stored_nets, expected):
    net = stored_nets["main"]
    denoiser = Denoiser(net, *edm2_denoiser_parts(net))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = denoiser(expected["x"], expected["sigma"], expected["class_labels"])
    assert out.dtype == torch.float32 and 1e-4 < relative_error(out, expected["out"]["main"]) < 3e-2
