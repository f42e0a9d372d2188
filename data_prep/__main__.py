"""`python -m data_prep prepare|shard|stats` (also `ssamba shard ...`; the Makefile calls it).

prepare  corpus folder -> manifest.jsonl (+ labels.csv); no audio is decoded
shard    prepare, then write WebDataset shards, rejects.jsonl, index.json, stats.json
stats    recompute the fbank (or MFCC) mean/std and clip durations of a shard folder into
         its stats.json
render-gm-drums  render the GM drum development set from SoundFonts (then shard it)
render-gm-notes  render unlabelled notes of every melodic GM program (pretraining audio)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep import CORPORA, prepare
from data_prep.manifest import iter_split_counts, read_manifest

EXAMPLES = """examples:
  python -m data_prep prepare --corpus esc50 --src /data/ESC-50-master --out work/esc50
  python -m data_prep shard --corpus fsdd --src ../shared/data/fsdd --out work/shards/fsdd --workers 2
  python -m data_prep shard --corpus manifest --src my_data/clips.csv --out work/shards/mine
  python -m data_prep stats --shards work/shards/fsdd

Re-running `shard` with the same arguments skips every finished shard whose tar is
still whole (resume); a missing or damaged tar is rewritten.
Inputs that fail to decode or validate are listed with their reason in rejects.jsonl.
"""


def main(argv: list[str] | None = None, prog: str = "python -m data_prep") -> int:
    """Run a command; a mistake in the input is one line `<command>: <what>` and exit 2."""
    args = _parser(prog).parse_args(argv)
    name = "ssamba" if prog == "ssamba" else "data_prep"
    try:
        return args.run(args)
    except (OSError, ValueError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{name} {args.command}: {message}", file=sys.stderr)
        return 2


def shard_main(argv: list[str] | None = None) -> int:
    """`ssamba shard ...`: the `shard` subcommand without its name."""
    return main(["shard", *(sys.argv[1:] if argv is None else argv)], prog="ssamba")


def _prepare(args: argparse.Namespace) -> int:
    manifest = prepare(args.corpus, args.src, args.out)
    records = read_manifest(manifest)
    clips = [r for r in records if "reject" not in r]
    splits = ", ".join(f"{name} {n}" for name, n in iter_split_counts(clips))
    others = f"; {len(records) - len(clips)} other files" if len(clips) < len(records) else ""
    print(f"{args.corpus}: {len(clips)} clips [{splits}]{others} -> {manifest}")
    return 0


def _check_positive(args: argparse.Namespace, *options: str) -> None:
    """ValueError naming the first of `options` given a value that is not above 0
    (0 workers or a 0 MB shard would stall or loop; -1 is no count)."""
    for option in options:
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None and not value > 0:
            raise ValueError(f"{option} {value:g}: must be above 0")


def _shard(args: argparse.Namespace) -> int:
    from data_prep.shard import write_shards  # torch import only when needed

    _check_positive(args, "--workers", "--shard-size", "--shard-mb", "--stats-clips")
    manifest = prepare(args.corpus, args.src, args.out)
    write_shards(
        manifest,
        args.out,
        workers=args.workers,
        shard_size=args.shard_size,
        shard_mb=args.shard_mb,
        stats_clips=args.stats_clips,
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from data_prep.stats import compute_stats

    _check_positive(args, "--workers", "--max-clips", "--num-ceps")
    compute_stats(
        args.shards,
        workers=args.workers,
        max_clips=args.max_clips,
        kind=args.kind,
        num_ceps=args.num_ceps,
    )
    return 0


def _render_gm_drums(args: argparse.Namespace) -> int:
    from data_prep.gm_drums import render_gm_drums

    counts = render_gm_drums(args.train, args.test, args.out)
    print(
        f"gm-drums: {counts['written']} hits -> {args.out}; {counts['silent']} silent "
        "(a kit without a sample for that key) left out"
    )
    return 0


def _render_gm_notes(args: argparse.Namespace) -> int:
    from data_prep.gm_drums import render_gm_notes

    counts = render_gm_notes(args.fonts, args.out)
    print(f"gm-notes: {counts['written']} notes -> {args.out}; {counts['silent']} silent left out")
    return 0


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Prepare audio corpora and write WebDataset shards (16 kHz flac + json).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    corpora = ", ".join(CORPORA)

    prep = commands.add_parser(
        "prepare",
        help="write manifest.jsonl (+ labels.csv) of a corpus; no audio decoded",
        description=f"Read a corpus folder and its official metadata into manifest.jsonl. Corpora: {corpora}.",
    )
    _corpus_args(prep)
    prep.set_defaults(run=_prepare)

    shard = commands.add_parser(
        "shard",
        help="prepare + write WebDataset shards, rejects.jsonl, index.json, stats.json",
        description=(
            "Prepare the corpus, decode and validate every clip, resample to 16 kHz mono and "
            "write <split>-NNNNNN.tar shards of flac + json. Resumable: finished shards are "
            f"skipped on re-run. Corpora: {corpora}."
        ),
    )
    _corpus_args(shard)
    shard.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    shard.add_argument(
        "--shard-size", type=int, default=1000, help="max clips per shard (default 1000)"
    )
    shard.add_argument(
        "--shard-mb",
        type=float,
        default=None,
        help="also cap shards at this many MB of PCM16 audio",
    )
    shard.add_argument(
        "--stats-clips",
        type=int,
        default=2000,
        help="clips (evenly spaced) measured for the fbank mean/std (default 2000)",
    )
    shard.set_defaults(run=_shard)

    stats = commands.add_parser(
        "stats",
        help="recompute fbank mean/std and clip-duration quantiles of a shard folder into stats.json",
        description="Decode the shards listed in index.json and measure the fbank mean/std.",
    )
    stats.add_argument("--shards", type=Path, required=True, help="folder written by `shard`")
    stats.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    stats.add_argument(
        "--max-clips", type=int, default=None, help="measure about this many clips (default: all)"
    )
    stats.add_argument(
        "--kind",
        choices=["fbank", "mfcc"],
        default="fbank",
        help="which features (mfcc: adds mfcc_* entries, keeps the fbank ones)",
    )
    stats.add_argument("--num-ceps", type=int, default=40, help="MFCC coefficients (mfcc only)")
    stats.set_defaults(run=_stats)

    drums = commands.add_parser(
        "render-gm-drums",
        help="render the GM drum development set from SoundFonts (FluidSynth)",
        description=(
            "Render the drum hits of the GS kits in General-MIDI SoundFonts to 1 s, 16 kHz "
            "wavs in OUT/{train,test}/{class}/; shard them with --corpus gm-drums."
        ),
    )
    drums.add_argument(
        "--train",
        type=Path,
        nargs="+",
        required=True,
        help="SoundFonts (.sf2/.sf3) for the train split",
    )
    drums.add_argument(
        "--test",
        type=Path,
        nargs="+",
        required=True,
        help="SoundFonts whose kits are held out as test",
    )
    drums.add_argument("--out", type=Path, required=True, help="output folder")
    drums.set_defaults(run=_render_gm_drums)

    notes = commands.add_parser(
        "render-gm-notes",
        help="render unlabelled notes of every melodic GM program (more pretraining audio)",
        description=(
            "Render every melodic program of General-MIDI SoundFonts at C2..C6, two "
            "velocities, 1 s at 16 kHz, into OUT/; shard them with --corpus unlabelled."
        ),
    )
    notes.add_argument(
        "--fonts", type=Path, nargs="+", required=True, help="SoundFonts (.sf2/.sf3)"
    )
    notes.add_argument("--out", type=Path, required=True, help="output folder")
    notes.set_defaults(run=_render_gm_notes)
    return parser


def _corpus_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus", required=True, choices=list(CORPORA), metavar="NAME", help="corpus recipe"
    )
    parser.add_argument(
        "--src",
        type=Path,
        required=True,
        help="corpus folder as distributed (for `manifest`: a .csv or .jsonl list of clips)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")


if __name__ == "__main__":
    sys.exit(main())
