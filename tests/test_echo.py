"""Echo simulator of the dense scenes: arrival times, levels, binaural cues, a naive per-pixel reference, seeds."""

import math

import numpy as np
import pytest
import torch

from kdforge.errors import KdforgeError
from kdforge.tasks.dense.echo import EchoConfig, echo_spectrograms, procedural_echo_split, received_signals
from kdforge.tasks.dense.scenes import Scene, SceneObject, render, render_all

C = 343.0
SR = 16_000


def wall(depth: float, size: int = 16) -> dict:
    """A scene whose only surface is a fronto-parallel wall (constant background depth, no objects)."""
    rendered = render(Scene(floor=(depth, 0.0, 0.0)), size)
    assert torch.allclose(rendered["depth"], torch.full((size, size), depth))
    assert torch.allclose(rendered["normals"][2], torch.ones(size, size))
    return rendered


def reference_chirp(cfg: EchoConfig) -> np.ndarray:
    """The emitted sweep written from its definition (Hann x linear chirp f_low -> f_high over chirp_s)."""
    n = int(round(cfg.chirp_s * cfg.sample_rate))
    t = np.arange(n) / cfg.sample_rate
    k = (cfg.f_high - cfg.f_low) / cfg.chirp_s
    return np.hanning(n) * np.sin(2 * np.pi * (cfg.f_low * t + 0.5 * k * t ** 2))


def arrival(signal: torch.Tensor, cfg: EchoConfig) -> float:
    """Matched filter: the lag (samples, parabolic sub-sample peak) at which the recording best matches the chirp."""
    corr = np.correlate(signal.double().numpy(), reference_chirp(cfg), mode="full")[cfg.chirp_samples - 1:]
    envelope = np.abs(corr)
    k = int(envelope.argmax())
    if 0 < k < envelope.size - 1:
        a, b, c = envelope[k - 1:k + 2]
        return k + 0.5 * (a - c) / (a - 2 * b + c)
    return float(k)


# narrow field of view (focal 20): every pixel of a wall at depth D is ~D away, so the echo is one chirp
MONO = dict(channels=1, mic_spacing=0.0, focal=20.0, noise=0.0)


@pytest.mark.parametrize("depth", [1.3, 2.0, 4.5])
def test_wall_echo_arrives_at_the_round_trip_time(depth):
    cfg = EchoConfig(**MONO)
    signal = received_signals(wall(depth), cfg)
    expected = 2 * depth / C * SR                       # emitter -> wall -> microphone (both at the camera)
    assert abs(arrival(signal[0], cfg) - expected) <= 1.0
    # the spectrogram's loudest frame is the one centred on the chirp's middle
    spec = echo_spectrograms(wall(depth), cfg)[0]
    frame = int(spec.exp().pow(2).sum(0).argmax())
    assert abs(frame - (expected + (cfg.chirp_samples - 1) / 2) / cfg.hop) <= 1.0


def test_nearer_wall_arrives_earlier_and_louder_by_the_square_of_the_distance():
    cfg = EchoConfig(**MONO)
    near, far = received_signals(wall(1.5), cfg)[0], received_signals(wall(3.0), cfg)[0]
    assert arrival(near, cfg) < arrival(far, cfg)
    ratio = near.abs().max() / far.abs().max()
    assert ratio == pytest.approx(4.0, rel=0.05)         # 1 / r^2 spreading, twice as near -> 4x


def test_slanted_wall_returns_less_than_a_facing_one():
    cfg = EchoConfig(**MONO)
    facing = wall(2.0)
    slanted = dict(facing, normals=torch.tensor([0.6, 0.0, 0.8]).view(3, 1, 1).expand(3, 16, 16).clone())
    ratio = received_signals(slanted, cfg).abs().max() / received_signals(facing, cfg).abs().max()
    assert ratio == pytest.approx(0.8, rel=0.02)         # incidence cosine


def test_surfaces_beyond_max_range_are_silent():
    cfg = EchoConfig(**MONO, max_range=3.0)
    assert received_signals(wall(3.5), cfg).abs().max() == 0
    assert received_signals(wall(2.5), cfg).abs().max() > 0


def naive_signals(rendered: dict, cfg: EchoConfig, signs: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel, per-microphone loop in float64: the echo of every surface point, one at a time
    (`signs` (H * W,): a diffuse surface's per-pixel sign, the amplitudes then scaled by sqrt(H W) / (H W))."""
    depth, normals = rendered["depth"].double().numpy(), rendered["normals"].double().numpy()
    h, w = depth.shape
    pulse = reference_chirp(cfg)
    length = cfg.num_samples
    t = np.arange(length)
    out = np.zeros((cfg.channels, length))
    half = (cfg.channels - 1) / 2
    for c in range(cfg.channels):
        mic = np.array([(c - half) * cfg.mic_spacing, 0.0, 0.0])
        turn = math.radians(cfg.mic_angle) * ((c - half) / half if half else 0.0)
        facing = np.array([math.sin(turn), 0.0, math.cos(turn)])
        for i in range(h):
            for j in range(w):
                z = depth[i, j]
                p = z * np.array([((j + 0.5) / w - 0.5) / cfg.focal, ((i + 0.5) / h - 0.5) / cfg.focal, 1.0])
                r1, r2 = np.linalg.norm(p), np.linalg.norm(mic - p)
                if r1 > cfg.max_range:
                    continue
                n = normals[:, i, j] * np.array([1.0, 1.0, -1.0])         # z towards the camera -> camera frame
                cos_in = max(0.0, float(-(n @ p) / r1))
                cos_mic = max(0.0, float(facing @ ((p - mic) / r2)))
                gain = 1 - cfg.directivity + cfg.directivity * cos_mic
                a = cos_in * gain / (r1 * r2) / (h * w)
                if signs is not None:
                    a *= signs[i * w + j] * math.sqrt(h * w)
                delay = (r1 + r2) / cfg.speed_of_sound * cfg.sample_rate
                out[c] += a * np.interp(t - delay, np.arange(pulse.size), pulse, left=0.0, right=0.0)
    return out


def test_vectorised_signals_match_a_naive_per_pixel_loop():
    scene = Scene(objects=[SceneObject("sphere", (0.3, 0.6), 0.25, 0.0, 1.4, 1.0, (1.0, 0.0, 0.0)),
                           SceneObject("box", (0.7, 0.3), 0.2, 0.5, 2.0, 0.8, (0.0, 1.0, 0.0))],
                  floor=(3.0, 1.5, 0.4))
    rendered = render(scene, 10)
    cfg = EchoConfig(channels=3, mic_spacing=0.3, noise=0.0, max_range=3.5)   # some background is out of range
    got = received_signals(rendered, cfg).double().numpy()
    want = naive_signals(rendered, cfg)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert not np.allclose(got[0], got[2], atol=1e-3 * np.abs(want).max())


def test_diffuse_scatter_matches_the_loop_with_seeded_signs_and_does_not_cancel():
    from kdforge.tasks.base import seeded_generator

    scene = Scene(objects=[SceneObject("sphere", (0.3, 0.6), 0.25, 0.0, 1.4, 1.0, (1.0, 0.0, 0.0))],
                  floor=(3.0, 1.5, 0.4))
    rendered = render(scene, 8)
    cfg = EchoConfig(noise=0.0, scatter="diffuse")
    signs = torch.randint(0, 2, (64,), generator=seeded_generator(4, 89, 0)).double().numpy() * 2 - 1
    got = received_signals(rendered, cfg, seed=4).double().numpy()
    want = naive_signals(rendered, cfg, signs)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert not np.allclose(got, received_signals(rendered, cfg, seed=5).double().numpy())
    # scene i of a batch draws its signs from (seed, i), whatever the chunking
    many = render_all([scene, Scene(floor=(2.5, 1.0, -0.3))], 8)
    assert torch.allclose(received_signals(many, cfg, seed=4, chunk=1), received_signals(many, cfg, seed=4),
                          atol=1e-7)
    assert torch.allclose(received_signals(many, cfg, seed=4)[0], torch.from_numpy(got).float(), atol=1e-7)
    # a large receding plane mostly cancels when coherent, not when diffuse; the diffuse level (mean power over
    # seeds) does not depend on the resolution
    plane = {n: render(Scene(floor=(2.0, 2.0, 0.0)), n) for n in (16, 32)}
    coherent = received_signals(plane[32], EchoConfig(noise=0.0)).pow(2).sum()
    power = {n: torch.stack([received_signals(plane[n], cfg, seed=k).pow(2).sum() for k in range(8)]).mean()
             for n in (16, 32)}
    assert power[32] > 20 * coherent
    assert float(power[16] / power[32]) == pytest.approx(1.0, rel=0.3)


def off_centre(x: float, relief: float = 0.8) -> dict:
    obj = SceneObject("sphere", (x, 0.5), 0.18, 0.0, 1.2, relief, (1.0, 0.0, 0.0))
    return render(Scene(objects=[obj], floor=(9.0, 0.0, 0.0)), 24)      # background beyond max_range: silent


def test_left_and_right_microphones_differ_for_an_off_centre_object():
    cfg = EchoConfig(noise=0.0)                                            # 2 microphones, x = -0.1 (left), +0.1
    right = received_signals(off_centre(0.8), cfg)
    spec = echo_spectrograms(off_centre(0.8), cfg)
    assert (spec[1] - spec[0]).abs().max() > 0.5
    assert torch.allclose(received_signals(off_centre(0.2), cfg).flip(0), right, atol=1e-6)   # mirror -> swapped
    centred = received_signals(off_centre(0.5), cfg)
    assert torch.allclose(centred[0], centred[1], atol=1e-6)               # symmetric scene -> equal channels
    # a flat disc to the right is louder at the right microphone, whatever the directivity
    disc = off_centre(0.75, relief=0.0)
    for directivity in (0.0, 0.5):
        signal = received_signals(disc, EchoConfig(noise=0.0, directivity=directivity))
        assert signal[1].pow(2).sum() > 1.5 * signal[0].pow(2).sum()


def test_a_single_reflecting_pixel_gives_the_predicted_time_and_level_difference():
    size, (i, j), z = 16, (8, 13), 1.5                                     # one pixel right of centre, the rest silent
    depth = torch.full((size, size), 50.0)
    depth[i, j] = z
    rendered = {"depth": depth, "normals": torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, size, size)}
    cfg = EchoConfig(noise=0.0, max_range=3.0)
    signal = received_signals(rendered, cfg)
    p = np.array([((j + 0.5) / size - 0.5) * z, ((i + 0.5) / size - 0.5) * z, z])    # focal 1
    r1 = np.linalg.norm(p)
    left, right = np.linalg.norm(p - [-0.1, 0, 0]), np.linalg.norm(p - [0.1, 0, 0])
    assert arrival(signal[0], cfg) == pytest.approx((r1 + left) / C * SR, abs=0.3)
    assert arrival(signal[1], cfg) == pytest.approx((r1 + right) / C * SR, abs=0.3)
    s = math.sqrt(0.5)                                                     # microphones face +-45 degrees
    gain_left = 0.5 + 0.5 * max(0.0, (p - [-0.1, 0, 0]) @ [-s, 0, s] / left)
    gain_right = 0.5 + 0.5 * max(0.0, (p - [0.1, 0, 0]) @ [s, 0, s] / right)
    level = signal[1].abs().max() / signal[0].abs().max()
    assert level == pytest.approx(gain_right / right / (gain_left / left), rel=0.03)


def test_seeded_and_shapes():
    a = procedural_echo_split(6, seed=3, size=24)
    b = procedural_echo_split(6, seed=3, size=24)
    c = procedural_echo_split(6, seed=4, size=24)
    cfg = EchoConfig()
    assert a.spectrograms.shape == (6, 2, cfg.n_fft // 2 + 1, cfg.num_frames)
    assert a.spectrograms.dtype == torch.float32 and torch.isfinite(a.spectrograms).all()
    assert a.images.shape == (6, 3, 24, 24) and a.images.dtype == torch.uint8 and len(a) == 6
    assert set(a.targets) == {"depth", "semseg"}
    assert a.targets["depth"].shape == (6, 24, 24) and a.targets["semseg"].dtype == torch.int64
    assert torch.equal(a.spectrograms, b.spectrograms) and torch.equal(a.images, b.images)
    assert not torch.equal(a.spectrograms, c.spectrograms)
    rendered = render(a.scenes[0], 24)
    # one scene -> (C, F, T); noise is seeded by (seed, scene index)
    assert torch.equal(echo_spectrograms(rendered, cfg, seed=3), a.spectrograms[0])
    assert not torch.equal(echo_spectrograms(rendered, cfg, seed=5), a.spectrograms[0])
    four = EchoConfig(channels=4, n_fft=128, hop=32)
    assert echo_spectrograms(rendered, four).shape == (4, 65, four.num_frames)


@pytest.mark.parametrize("field, value", [
    ("sample_rate", 0), ("f_low", -1.0), ("f_low", 8000.0), ("f_high", 9000.0), ("chirp_s", 0.0),
    ("max_range", 0.0), ("speed_of_sound", -1.0), ("channels", 0), ("mic_spacing", -0.1), ("mic_angle", 120.0),
    ("directivity", 1.5), ("focal", 0.0), ("noise", -1.0), ("n_fft", 4), ("hop", 0), ("hop", 128), ("log_eps", 0.0),
    ("scatter", "rough"),
])
def test_bad_config_values_are_one_line_errors(field, value):
    with pytest.raises(KdforgeError) as err:
        EchoConfig(**{field: value})
    assert "\n" not in str(err.value) and field in str(err.value)


def test_other_bad_inputs_are_one_line_errors():
    for call, needle in [
        (lambda: EchoConfig(max_range=0.01), "n_fft"),
        (lambda: EchoConfig.from_mapping({"sampel_rate": 8000}), "sampel_rate"),
        (lambda: echo_spectrograms({"depth": torch.ones(8, 8)}), "normals"),
        (lambda: echo_spectrograms({"depth": torch.ones(8, 8), "normals": torch.ones(8, 8)}), "normals"),
        (lambda: procedural_echo_split(2, 0, tasks=("colour",)), "colour"),
    ]:
        with pytest.raises(KdforgeError) as err:
            call()
        assert "\n" not in str(err.value) and needle in str(err.value)
    assert EchoConfig.from_mapping({"channels": 1, "mic_spacing": 0.0}).channels == 1


def test_split_spectrograms_encode_the_nearest_surface():
    """The first frame rising above the noise floor is the round trip to the scene's nearest pixel."""
    data = procedural_echo_split(48, seed=1, size=32)
    cfg = data.config
    energy = data.spectrograms.exp().pow(2).sum(2).mean(1)                 # (N, frames)
    floor = energy[:, :3].mean(1, keepdim=True)                            # no surface is nearer than ~1 m
    onset = (energy > 30 * floor).float().argmax(1).float()
    nearest = data.targets["depth"].flatten(1).min(1).values               # on the view axis: ~the nearest range
    expected = 2 * nearest / C * SR / cfg.hop
    assert (onset - expected).abs().le(1.5).float().mean() >= 0.9
    assert torch.corrcoef(torch.stack([onset, expected]))[0, 1] > 0.9
    chunked = received_signals(render_all(data.scenes[:5], 32), cfg, seed=1, chunk=2)
    assert torch.allclose(chunked, received_signals(render_all(data.scenes[:5], 32), cfg, seed=1), atol=1e-7)
