"""The GM drum development set: rendered from a real SoundFont (Debian's TimGM6mb, GPL-2,
installed by `.ci/run` with libfluidsynth3), labelled by the GM key map, test kits apart;
and the unlabelled melodic notes rendered beside it for pretraining."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.__main__ import main
from data_prep.folder import prepare_unlabelled
from data_prep.gm_drums import (
    DRUM_CLASSES,
    KIT_PROGRAMS,
    NOTE_KEYS,
    NOTE_VELOCITIES,
    SAMPLE_RATE,
    prepare_gm_drums,
)
from data_prep.manifest import read_manifest
from ssamba.data.shard_format import read_labels

FONT = Path("/usr/share/sounds/sf2/TimGM6mb.sf2")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gm_drums")
    # the same font on both sides keeps the test small; the real set holds other fonts out
    args = ["render-gm-drums", "--train", str(FONT), "--test", str(FONT), "--out", str(out)]
    assert main(args) == 0
    return out


def test_every_kit_renders_every_key_at_every_velocity(rendered: Path) -> None:
    keys = sum(len(k) for k in DRUM_CLASSES.values())
    for split in ("train", "test"):
        files = sorted((rendered / split).glob("*/*.wav"))
        assert len(files) == len(KIT_PROGRAMS) * keys * 4  # TimGM6mb has all 8 GS kits
        assert {f.parent.name for f in files} == set(DRUM_CLASSES)
    audio, rate = sf.read(files[0])
    assert rate == SAMPLE_RATE and audio.ndim == 1 and len(audio) == SAMPLE_RATE
    assert np.abs(audio).max() > 1e-3


def test_the_key_map_puts_kick_low_and_hihat_high(rendered: Path) -> None:
    """Labels follow the GM percussion map: a kick's energy sits far below a closed hi-hat's."""

    def centroid(path: Path) -> float:
        audio, rate = sf.read(path)
        power = np.abs(np.fft.rfft(audio)) ** 2
        freqs = np.fft.rfftfreq(len(audio), 1 / rate)
        return float((power * freqs).sum() / power.sum())

    kick = centroid(rendered / "train/kick/Timgm6Mb-Standard_k36_v100.wav")
    hihat = centroid(rendered / "train/hihat_closed/Timgm6Mb-Standard_k42_v100.wav")
    assert kick * 4 < hihat


def test_manifest_keeps_kit_and_split(rendered: Path, tmp_path: Path) -> None:
    records = read_manifest(prepare_gm_drums(rendered, tmp_path))
    assert {r["split"] for r in records} == {"train", "test"}
    snare = next(r for r in records if r["id"] == "test/snare/Timgm6Mb-Jazz_k38_v70")
    assert snare["labels"] == ["snare"] and snare["kit"] == "Timgm6Mb-Jazz"
    assert [name for _, name in read_labels(tmp_path / "labels.csv")] == list(DRUM_CLASSES)


def test_a_foreign_file_is_named(rendered: Path, tmp_path: Path) -> None:
    stray = rendered / "train" / "kick" / "my_kick.wav"
    stray.write_bytes((rendered / "train/kick/Timgm6Mb-Standard_k36_v100.wav").read_bytes())
    try:
        with pytest.raises(ValueError, match=r"my_kick\.wav: not a rendered GM drum hit"):
            prepare_gm_drums(rendered, tmp_path)
    finally:
        stray.unlink()


def test_a_missing_soundfont_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["render-gm-drums", "--train", str(tmp_path / "no.sf2"), "--test", str(FONT)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "no.sf2: SoundFont not found" in capsys.readouterr().err


def test_melodic_notes_render_unlabelled_for_pretraining(tmp_path: Path) -> None:
    out = tmp_path / "notes"
    assert main(["render-gm-notes", "--fonts", str(FONT), "--out", str(out)]) == 0
    files = sorted(out.glob("*.wav"))
    per_program = len(NOTE_KEYS) * len(NOTE_VELOCITIES)
    programs = {f.stem.split("_")[0] for f in files}
    assert len(programs) == 128  # TimGM6mb has every GM program
    assert len(files) > 0.95 * 128 * per_program  # a few high notes may have no sample
    piano, rate = sf.read(out / "Timgm6Mb-p0_k60_v110.wav")
    assert rate == SAMPLE_RATE and len(piano) == SAMPLE_RATE and np.abs(piano).max() > 0.01
    records = read_manifest(prepare_unlabelled(out, tmp_path / "manifest"))
    assert len(records) == len(files) and all(r["labels"] == [] for r in records)
