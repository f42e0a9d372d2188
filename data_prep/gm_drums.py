"""GM drum one-shots: a labelled development set rendered from General-MIDI SoundFonts.

A second real-audio set beside FSDD for `ssamba label-efficiency` (issue 13): drum hits
from the recorded drum kits that Debian's SoundFont packages ship, classified by
instrument, with whole kits of other SoundFonts held out as the test split, so a model
must recognise a snare it has never heard.

    render_gm_drums(train_fonts, test_fonts, out)  -> out/{train,test}/{class}/{clip}.wav
    prepare_gm_drums(out, manifest_dir)             -> manifest with `kit` in every clip
    render_gm_notes(fonts, out)                     -> out/{clip}.wav: unlabelled notes of
                                                       every melodic program, more audio to
                                                       pretrain on (`--corpus unlabelled`)

Kits: the eight GS kit programs (Standard, Room, Power, Electronic, TR-808, Jazz, Brush,
Orchestra) in bank 128 of each font; a font's numbered variants ("Standard 3") are mostly
the same kit re-voiced and are left out. Classes: 7 instrument groups of the GM percussion key
map (`DRUM_CLASSES`). Each key is rendered at several velocities, since good fonts switch
to another recording per velocity layer, 1 s at 16 kHz, without reverb or chorus (they
would smear the kit's own sound). A key a kit has no sample for renders silence: it is
counted and left out, never written.

FluidSynth renders (Debian `libfluidsynth3`, PyPI `pyfluidsynth`, the `devsets` extra);
`make devset-drums` builds the set from `fluid-soundfont-gm` (FluidR3, MIT) and
`timgm6mb-soundfont` (GPL-2) for training and `musescore-general-soundfont` (MIT) for test.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile

from data_prep.manifest import clip_record, finish, require

# GM percussion key map (channel 10) -> class; keys are MIDI note numbers
DRUM_CLASSES: dict[str, tuple[int, ...]] = {
    "kick": (35, 36),
    "snare": (38, 40),
    "clap": (39,),
    "tom": (41, 43, 45, 47, 48, 50),
    "hihat_closed": (42, 44),
    "hihat_open": (46,),
    "cymbal": (49, 51, 52, 53, 55, 57, 59),
}
KIT_PROGRAMS: tuple[int, ...] = (0, 8, 16, 24, 25, 32, 40, 48)  # the GS kits in bank 128
VELOCITIES: tuple[int, ...] = (40, 70, 100, 127)
NOTE_KEYS: tuple[int, ...] = (36, 48, 60, 72, 84)  # C2..C6
NOTE_VELOCITIES: tuple[int, ...] = (60, 110)
SAMPLE_RATE = 16000
SECONDS = 1.0
DRUM_CHANNEL = 9  # MIDI channel 10
SILENCE_PEAK = 1e-3  # a rendered hit below this peak (full scale 1) is a missing sample
_CLIP_NAME = re.compile(r"(?P<kit>.+)_k(?P<key>\d+)_v(?P<velocity>\d+)")


def render_gm_drums(
    train_fonts: Sequence[Path],
    test_fonts: Sequence[Path],
    out_dir: Path,
    velocities: Sequence[int] = VELOCITIES,
) -> Counter:
    """Render every kit's hits into `out_dir/{split}/{class}/{font}-{kit}_k{key}_v{vel}.wav`.

    Returns counts: `written` and `silent` (keys a kit has no sample for, not written).
    """
    fluidsynth = _import_fluidsynth()
    counts: Counter = Counter()
    for split, fonts in (("train", train_fonts), ("test", test_fonts)):
        for font in fonts:
            font = require(Path(font), "SoundFont")
            synth, font_id = _open_font(fluidsynth, font)
            for program in KIT_PROGRAMS:
                name = synth.sfpreset_name(font_id, 128, program)
                if not name:
                    continue
                kit = f"{_slug(font.stem)}-{_slug(name)}"
                synth.program_select(DRUM_CHANNEL, font_id, 128, program)
                for label, keys in DRUM_CLASSES.items():
                    folder = Path(out_dir) / split / label
                    folder.mkdir(parents=True, exist_ok=True)
                    for key in keys:
                        for velocity in velocities:
                            hit = _render_hit(synth, DRUM_CHANNEL, key, velocity)
                            _write_unless_silent(
                                hit, folder / f"{kit}_k{key}_v{velocity}.wav", counts
                            )
            synth.delete()
    return counts


def prepare_gm_drums(src_dir: Path, out_dir: Path) -> Path:
    """Manifest of a rendered folder: label = class folder, `kit` = font and kit name."""
    src_dir = require(Path(src_dir), "rendered GM drums folder (make devset-drums)")
    records = []
    for split in ("train", "test"):
        for path in sorted((src_dir / split).glob("*/*.wav")):
            match = _CLIP_NAME.fullmatch(path.stem)
            if match is None or path.parent.name not in DRUM_CLASSES:
                raise ValueError(
                    f"{path}: not a rendered GM drum hit ({{class}}/{{kit}}_kKEY_vVEL.wav)"
                )
            clip_id = f"{split}/{path.parent.name}/{path.stem}"
            extra = {
                "kit": match["kit"],
                "key": int(match["key"]),
                "velocity": int(match["velocity"]),
            }
            records.append(clip_record(clip_id, path, [path.parent.name], split, extra=extra))
    if not records:
        raise FileNotFoundError(f"{src_dir}: no train/{{class}}/*.wav or test/{{class}}/*.wav")
    return finish(records, Path(out_dir), [(name, name) for name in DRUM_CLASSES])


def render_gm_notes(
    fonts: Sequence[Path],
    out_dir: Path,
    keys: Sequence[int] = NOTE_KEYS,
    velocities: Sequence[int] = NOTE_VELOCITIES,
) -> Counter:
    """Every melodic program (bank 0) of `fonts` at `keys` and `velocities`, unlabelled, to
    `out_dir/{font}-p{program}_k{key}_v{vel}.wav`: more audio to pretrain on. Use the
    training fonts only, so nothing of the held-out kits' font is seen in pretraining.

    Returns counts: `written` and `silent` (a program without a sample there).
    """
    fluidsynth = _import_fluidsynth()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    for font in fonts:
        font = require(Path(font), "SoundFont")
        synth, font_id = _open_font(fluidsynth, font)
        for program in range(128):
            if not synth.sfpreset_name(font_id, 0, program):
                continue
            synth.program_select(0, font_id, 0, program)
            for key in keys:
                for velocity in velocities:
                    note = _render_hit(synth, 0, key, velocity)
                    name = f"{_slug(font.stem)}-p{program}_k{key}_v{velocity}.wav"
                    _write_unless_silent(note, out_dir / name, counts)
        synth.delete()
    return counts


def _write_unless_silent(audio: np.ndarray, path: Path, counts: Counter) -> None:
    """Write a rendered note as 16-bit wav and count it, or count it silent (no sample)."""
    if np.abs(audio).max() < SILENCE_PEAK:
        counts["silent"] += 1
        return
    soundfile.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    counts["written"] += 1


def _open_font(fluidsynth, font: Path) -> tuple:
    """(synth, font id) at 16 kHz, reverb and chorus off: the font's own recordings."""
    synth = fluidsynth.Synth(gain=0.5, samplerate=float(SAMPLE_RATE))
    synth.setting("synth.reverb.active", 0)
    synth.setting("synth.chorus.active", 0)
    font_id = synth.sfload(str(font))
    if font_id == -1:
        raise ValueError(f"{font}: FluidSynth cannot read this SoundFont")
    return synth, font_id


def _render_hit(synth, channel: int, key: int, velocity: int) -> np.ndarray:
    """(SAMPLE_RATE * SECONDS,) float32 mono: note on at 0, off at 0.2 s, cut at 1 s."""
    held = int(0.2 * SAMPLE_RATE)
    synth.noteon(channel, key, velocity)
    head = synth.get_samples(held)
    synth.noteoff(channel, key)
    tail = synth.get_samples(int(SECONDS * SAMPLE_RATE) - held)
    synth.all_sounds_off(channel)  # no ringing cymbal leaks into the next hit
    synth.get_samples(SAMPLE_RATE // 10)
    stereo = np.concatenate([head, tail]).reshape(-1, 2).astype(np.float32) / 32768.0
    return stereo.mean(axis=1)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "", name.title())


def _import_fluidsynth():
    try:
        import fluidsynth
    except (ImportError, OSError) as err:
        raise OSError(
            "rendering GM drums needs FluidSynth: apt-get install libfluidsynth3 and "
            f"pip install -e '.[devsets]' ({err})"
        ) from err
    return fluidsynth
