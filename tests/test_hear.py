"""The HEAR API: documented shapes, dtypes and timestamps, on real audio."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _encoder_files import write_small_encoder

from ssamba import hear
from ssamba.audio import load_audio

FREQ_PATCHES, WIDTH = 8, 32


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> hear.HearModel:
    path = write_small_encoder(tmp_path_factory.mktemp("enc") / "encoder.pt")
    return hear.load_model(str(path))


@pytest.fixture(scope="module")
def digits(fsdd_dir: Path) -> torch.Tensor:
    """Three spoken digits zero-padded to 1 s, as HEAR batches clips of equal length."""
    waves = [load_audio(p)[0] for p in sorted((fsdd_dir / "recordings").glob("2_lucas_*.wav"))[:3]]
    return torch.stack([torch.nn.functional.pad(w, (0, 16000 - len(w))) for w in waves])


def test_model_announces_its_rate_and_sizes(model: hear.HearModel) -> None:
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == WIDTH
    assert model.timestamp_embedding_size == FREQ_PATCHES * WIDTH  # frequency concatenated


def test_scene_embeddings_are_float32_one_row_per_clip(
    model: hear.HearModel, digits: torch.Tensor
) -> None:
    scene = hear.get_scene_embeddings(digits, model)

    assert scene.shape == (3, model.scene_embedding_size) and scene.dtype == torch.float32
    assert not torch.allclose(scene[0], scene[1])


def test_a_clip_gets_the_same_embedding_alone_or_in_a_batch(
    model: hear.HearModel, digits: torch.Tensor
) -> None:
    alone = hear.get_scene_embeddings(digits[1:2], model)
    torch.testing.assert_close(alone[0], hear.get_scene_embeddings(digits, model)[1])


def test_timestamps_increase_inside_the_clip_across_window_borders(
    model: hear.HearModel, sample_wav: Path
) -> None:
    wave, _ = load_audio(sample_wav)
    audio = wave[: 16000 * 7].expand(2, -1)  # 7 s: three 2.56 s windows
    patch_grid = hear.HearModel(model.embedder, timestamp_hop_ms=None)

    embeddings, timestamps = hear.get_timestamp_embeddings(audio, patch_grid)

    assert embeddings.dtype == torch.float32 and timestamps.dtype == torch.float32
    assert embeddings.shape == (2, timestamps.shape[1], model.timestamp_embedding_size)
    assert timestamps.shape == (2, 44)  # patch centres 87.5 + 160 k ms below 7000 ms
    assert (timestamps.diff(dim=1) > 0).all()
    assert timestamps.min() > 0 and timestamps.max() < 7000
    torch.testing.assert_close(embeddings[0], embeddings[1])


def test_timestamps_come_every_40_ms_by_default_from_patches_the_encoder_saw(
    model: hear.HearModel, sample_wav: Path
) -> None:
    wave, _ = load_audio(sample_wav)
    audio = wave[: 16000 * 7].expand(2, -1)
    patch_grid = hear.HearModel(model.embedder, timestamp_hop_ms=None)

    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    grid_embeddings, grid_times = hear.get_timestamp_embeddings(audio, patch_grid)

    assert model.timestamp_hop_ms == 40.0
    assert timestamps.shape == (2, 173)  # centres 87.5 + 40 k ms below 7000 ms
    torch.testing.assert_close(timestamps.diff(dim=1), torch.full((2, 172), 40.0))
    assert embeddings.shape == (2, 173, model.timestamp_embedding_size)
    every_fourth = embeddings[:, ::4]  # the unshifted pass: the patch grid itself
    assert torch.equal(timestamps[:, ::4], grid_times)
    torch.testing.assert_close(every_fourth, grid_embeddings)
    assert not torch.allclose(embeddings[:, 1], embeddings[:, 0])


def test_numpy_and_int16_audio_give_the_float_tensor_embeddings(
    model: hear.HearModel, digits: torch.Tensor
) -> None:
    as_int16 = (digits * 32768).round().clamp(-32768, 32767).to(torch.int16)
    expected = hear.get_scene_embeddings(as_int16.float() / 32768, model)

    for audio in (as_int16.numpy(), as_int16, (as_int16.float() / 32768).numpy()):
        torch.testing.assert_close(hear.get_scene_embeddings(audio, model), expected)
    stamped, _ = hear.get_timestamp_embeddings(as_int16.numpy(), model)
    torch.testing.assert_close(
        stamped, hear.get_timestamp_embeddings(as_int16.float() / 32768, model)[0]
    )


def test_averaging_frequency_patches_gives_width_sized_timestamp_embeddings(
    model: hear.HearModel, digits: torch.Tensor
) -> None:
    averaged = hear.HearModel(model.embedder, freq="mean")
    embeddings, timestamps = hear.get_timestamp_embeddings(digits, averaged)
    concatenated, _ = hear.get_timestamp_embeddings(digits, model)

    assert averaged.timestamp_embedding_size == WIDTH
    assert embeddings.shape == (3, timestamps.shape[1], WIDTH)
    torch.testing.assert_close(embeddings, concatenated.unflatten(2, (FREQ_PATCHES, WIDTH)).mean(2))


def test_a_clip_shorter_than_one_patch_still_gets_a_timestamp_inside_it(
    model: hear.HearModel,
) -> None:
    embeddings, timestamps = hear.get_timestamp_embeddings(torch.randn(1, 800), model)  # 50 ms

    assert embeddings.shape[1] == 1 and 0 < timestamps.item() < 50


def test_empty_path_gives_an_untrained_ssamba_tiny_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="randomly initialised"):
        model = hear.load_model("")

    assert model.scene_embedding_size == 192 and model.timestamp_embedding_size == 8 * 192


def test_a_nan_or_infinite_sample_is_refused_naming_the_clip(
    model: hear.HearModel, digits: torch.Tensor
) -> None:
    audio = digits.clone()
    audio[2, 1000] = float("nan")
    audio[1, 5] = float("inf")

    for embed in (hear.get_scene_embeddings, hear.get_timestamp_embeddings):
        with pytest.raises(ValueError, match=r"clip 1 has NaN or infinite samples \(clips 1, 2\)"):
            embed(audio, model)


@pytest.mark.parametrize("shape", [(0, 16000), (2, 0)])
def test_an_empty_batch_is_refused_with_a_clear_error(
    model: hear.HearModel, shape: tuple[int, int]
) -> None:
    for embed in (hear.get_scene_embeddings, hear.get_timestamp_embeddings):
        with pytest.raises(ValueError, match=rf"shape \({shape[0]}, {shape[1]}\) holds no audio"):
            embed(torch.zeros(shape), model)
