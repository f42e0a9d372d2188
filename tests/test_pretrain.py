"""MSPM pretraining: the objective's pieces, the schedule, and `ssamba pretrain` end to end.

Fast tests check the InfoNCE axes and temperature against a direct computation, the
plateau rule against torch's ReduceLROnPlateau, the two-pass masking, and that a bad
recipe stops with one line before any training. The slow ones run the real command on
real FSDD audio with a tiny encoder: it learns, logs, checkpoints, exports, and an
interrupted (SIGKILLed) run resumes where its checkpoint left off.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from test_datamodules import fsdd_clips, write_shard_folder

from ssamba.audio import load_audio
from ssamba.features import FbankConfig, wav_to_fbank
from ssamba.models.encoder import EncoderConfig
from ssamba.tasks import pretrain_cli
from ssamba.tasks.masking import make_mask
from ssamba.tasks.pretrain import MSPMConfig, PretrainTask, ScheduleConfig, info_nce
from ssamba.tasks.schedules import PlateauScale

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "pretrain" / "fsdd_tiny_cpu.yaml"
TINY = EncoderConfig(family="ssamba", depth=2, embed_dim=64)
# The recipe with a tiny-but-real encoder: 2 bidirectional Mamba layers (one flipped pair)
# of width 64 over the recipe's 8 x 4 patch grid; ~140 k parameters with the heads.
TINY_ARGS = ["--model.encoder.depth=2", "--model.encoder.embed_dim=64"]


def pretrain_data_args(shards: Path, out: Path) -> list[str]:
    """Point a recipe at test shards (training split; test split for validation) and a
    test output folder."""
    return [
        f"--data.sources=[{{shards: {shards}, splits: [train]}}]",
        f"--data.val={{shards: {shards}, splits: [test]}}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
    ]


# ------------------------------------------------------------------------------ InfoNCE
def direct_info_nce(
    preds: torch.Tensor, targets: torch.Tensor, axis: str, temperature: float
) -> tuple[float, float]:
    """InfoNCE written out with Python floats: score(t, p) = <target t, prediction p> / T.

    "original" (the released SSAST code): for target i, a softmax over the predictions.
    "paper" (SSAST equation 1): for prediction i, a softmax over the candidate targets.
    Accuracy as the originals compute it, `argmax(softmax(total, dim=-1), dim=0) == arange`:
    each row t of the scores is turned into probabilities over the predictions; prediction
    i is right when its own target has the highest probability in column i. Raw accuracy:
    prediction i is right when target i has the highest raw score in column i.
    """
    batch, masked, _ = preds.shape
    loss, hits, raw_hits = 0.0, 0, 0
    for b in range(batch):
        score = [
            [float(targets[b, t] @ preds[b, p]) / temperature for p in range(masked)]
            for t in range(masked)
        ]
        probs = [[math.exp(v) / sum(math.exp(w) for w in row) for v in row] for row in score]
        for i in range(masked):
            row = score[i] if axis == "original" else [score[t][i] for t in range(masked)]
            loss -= row[i] - math.log(sum(math.exp(v) for v in row))
            column = [probs[t][i] for t in range(masked)]
            hits += column.index(max(column)) == i
            raw_column = [score[t][i] for t in range(masked)]
            raw_hits += raw_column.index(max(raw_column)) == i
    count = batch * masked
    return loss / count, hits / count, raw_hits / count


@pytest.mark.parametrize("axis", ["original", "paper"])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_info_nce_is_a_log_softmax_over_the_documented_axis(axis, temperature):
    generator = torch.Generator().manual_seed(0)
    preds = torch.randn(3, 5, 4, generator=generator)
    targets = torch.randn(3, 5, 4, generator=generator)

    loss, accuracy, raw_accuracy = info_nce(preds, targets, axis, temperature)

    expected = direct_info_nce(preds, targets, axis, temperature)
    assert float(loss) == pytest.approx(expected[0], rel=1e-5)
    assert float(accuracy) == pytest.approx(expected[1])
    assert float(raw_accuracy) == pytest.approx(expected[2])


def test_the_originals_masked_accuracy_is_not_the_raw_score_argmax():
    # Row-wise softmax, then the argmax down each column, picks other targets than the
    # argmax of the raw scores whenever rows differ in scale, as on real MSPM tensors.
    generator = torch.Generator().manual_seed(4)
    preds = torch.randn(8, 20, 4, generator=generator)
    targets = preds + torch.randn(8, 20, 4, generator=generator)

    _, accuracy, raw_accuracy = info_nce(preds, targets, "original")

    _, expected, expected_raw = direct_info_nce(preds, targets, "original", 1.0)
    assert float(accuracy) == pytest.approx(expected) and float(raw_accuracy) == pytest.approx(
        expected_raw
    )
    assert abs(float(accuracy) - float(raw_accuracy)) > 0.02


def test_the_two_axes_differ_when_scores_are_not_symmetric():
    generator = torch.Generator().manual_seed(1)
    targets = torch.randn(2, 6, 8, generator=generator)
    preds = targets @ torch.randn(8, 8, generator=generator)  # scores t.Rp are not symmetric

    original = info_nce(preds, targets, "original")[0]
    paper = info_nce(preds, targets, "paper")[0]
    assert abs(float(original - paper)) > 1e-3


def test_temperature_sharpens_the_softmax():
    # 4 masked patches, each prediction equal to its own (orthonormal) target
    targets = torch.eye(4).unsqueeze(0)
    preds = targets.clone()
    losses = [float(info_nce(preds, targets, "original", t)[0]) for t in (100.0, 1.0, 0.1, 0.01)]

    assert losses == sorted(losses, reverse=True)
    assert losses[0] == pytest.approx(math.log(4), rel=0.01)  # hot: close to uniform
    assert losses[-1] < 1e-6  # cold: all mass on the own patch
    scaled = info_nce(preds / 0.1, targets, "original", 1.0)[0]
    assert float(scaled) == pytest.approx(losses[2], rel=1e-6)


def test_accuracy_counts_predictions_whose_best_target_is_their_own_patch():
    targets = torch.eye(4).unsqueeze(0)
    preds = targets[:, [0, 1, 3, 2]]  # positions 2 and 3 predict each other's patch

    _, accuracy, raw_accuracy = info_nce(preds, targets, "original")
    assert float(accuracy) == float(raw_accuracy) == 0.5


# ------------------------------------------------------------------------ schedule
def test_plateau_scale_follows_torch_reduce_lr_on_plateau():
    metrics = [0.0, 0.1, 0.2, 0.2, 0.19, 0.2, 0.21, 0.21, 0.21, 0.21, 0.05, 0.3]
    metrics += [0.30001, 0.3, 0.3, 0.3, 0.31, 0.29, 0.29, 0.29, 0.29, 0.29, 0.29]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.5, patience=2, threshold=1e-4
    )
    plateau = PlateauScale(factor=0.5, patience=2)
    scales = []
    for metric in metrics:
        reference.step(metric)
        plateau.step(metric)
        assert plateau.scale == optimizer.param_groups[0]["lr"]
        scales.append(plateau.scale)
    assert min(scales) < 0.25  # the sequence exercises several reductions


MSPM_FIELDS = {f.name for f in fields(MSPMConfig)}
SCHEDULE_FIELDS = {f.name for f in fields(ScheduleConfig)}


def _tiny_task(**kwargs) -> PretrainTask:
    """A task on the tiny encoder; objective and schedule fields may be given flat
    (`schedule="cosine"` is the schedule's kind)."""
    if isinstance(kwargs.get("schedule"), str):
        kwargs["kind"] = kwargs.pop("schedule")
    mspm = {"n_masked": 10, "cluster_sizes": (2, 3)}
    mspm |= {k: kwargs.pop(k) for k in list(kwargs) if k in MSPM_FIELDS}
    schedule = {k: kwargs.pop(k) for k in list(kwargs) if k in SCHEDULE_FIELDS}
    return PretrainTask(
        TINY,
        input_frames=64,
        objective=MSPMConfig(**mspm),
        schedule=ScheduleConfig(**schedule),
        **kwargs,
    )


def lr_at(task: PretrainTask, step: int) -> float:
    return task.hparams.lr * task.lr_factor(step)


def test_learning_rate_warms_up_then_follows_the_plateau_scale():
    task = _tiny_task(lr=1e-3, warmup_steps=10, schedule="plateau")

    assert lr_at(task, 0) == pytest.approx(1e-4)
    assert lr_at(task, 4) == pytest.approx(5e-4)
    assert lr_at(task, 9) == pytest.approx(1e-3)
    assert lr_at(task, 500) == pytest.approx(1e-3)
    task.plateau.scale = 0.25
    assert lr_at(task, 500) == pytest.approx(2.5e-4)
    assert lr_at(task, 4) == pytest.approx(1.25e-4)


def test_cosine_schedule_decays_from_the_peak_to_min_lr_at_max_steps():
    from lightning.pytorch import Trainer

    task = _tiny_task(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr=1e-5)
    task.trainer = Trainer(max_steps=110, logger=False, enable_checkpointing=False)
    rates = [lr_at(task, step) for step in range(120)]

    assert rates[9] == pytest.approx(1e-3)
    assert rates[60] == pytest.approx((1e-3 + 1e-5) / 2)
    assert rates[110] == pytest.approx(1e-5) and rates[119] == pytest.approx(1e-5)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))


def test_weight_decay_skips_norms_biases_tokens_and_ssm_rates():
    task = _tiny_task(weight_decay=0.05)
    decayed, plain = task.configure_optimizers().param_groups
    names = {id(p): n for n, p in task.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}

    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert decayed_names | plain_names == set(names.values())
    assert not decayed_names & plain_names
    mixer = "encoder.layers.0.mixer."
    for name in ("in_proj.weight", "x_proj_b.weight", "out_proj.weight"):
        assert mixer + name in decayed_names
    assert "cpredlayer.0.weight" in decayed_names
    for name in ("A_log", "A_b_log", "D", "D_b", "dt_proj.bias", "conv1d.bias"):
        assert mixer + name in plain_names
    for name in ("pos_embed", "cls_token", "mask_embed", "layers.0.norm.weight"):
        assert "encoder." + name in plain_names


# ------------------------------------------------------------------------ the objective
@pytest.fixture(scope="module")
def fsdd_fbank(fsdd_dir: Path) -> torch.Tensor:
    """4 real spoken digits as the recipe's normalised 64-frame filterbanks: (4, 64, 128)."""
    cfg = FbankConfig(target_length=64)
    waves = [load_audio(fsdd_dir / "recordings" / f"{d}_theo_7.wav")[0] for d in (1, 3, 5, 8)]
    return torch.stack([wav_to_fbank(w, 16000, cfg) for w in waves])


def test_plateau_counts_evaluations_inside_the_warm_up_as_the_originals(fsdd_fbank):
    """The originals' ReduceLROnPlateau sees every evaluation, those during warm-up too."""
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    task = _tiny_task(warmup_steps=1000, schedule="plateau")
    batch = {"fbank": fsdd_fbank[:2], "frames": torch.tensor([64, 64]), "id": ["a", "b"]}
    trainer = Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.validate(task, DataLoader([batch], batch_size=None), verbose=False)

    assert task.global_step == 0  # inside the warm-up
    assert task.plateau.best == pytest.approx(trainer.callback_metrics["val/acc"].item())


def test_masked_patches_are_hidden_from_the_encoder(fsdd_fbank):
    task = _tiny_task().eval()
    mask = make_mask(4, task.encoder.grid, 10, (2, 3), torch.Generator().manual_seed(0))
    # overwrite the masked patches of the input with noise
    patches = task.encoder.unfold_patches(fsdd_fbank)
    noisy = patches.clone()
    noisy[mask] = torch.randn_like(noisy[mask]) * 5
    folded = torch.nn.functional.fold(
        noisy.transpose(1, 2), (128, 64), kernel_size=(16, 16), stride=(16, 16)
    )
    changed = folded[:, 0].transpose(1, 2)
    assert not torch.allclose(changed, fsdd_fbank)

    with torch.no_grad():
        hidden = task.masked_hidden(fsdd_fbank, mask)
        assert torch.equal(hidden, task.masked_hidden(changed, mask))
        visible = task.masked_hidden(fsdd_fbank, ~mask)
        assert not torch.allclose(visible, task.masked_hidden(changed, ~mask))


def test_joint_loss_draws_one_mask_per_pass_like_the_originals(fsdd_fbank):
    task = _tiny_task(nce_weight=1.0, mse_weight=10.0)
    with torch.no_grad():
        out = task.mspm(fsdd_fbank, 10, torch.Generator().manual_seed(5))

    replay = torch.Generator().manual_seed(5)
    first = make_mask(4, task.encoder.grid, 10, (2, 3), replay)
    second = make_mask(4, task.encoder.grid, 10, (2, 3), replay)
    assert not torch.equal(first, second)
    # the reconstruction (generative pass) used the second draw
    assert torch.equal(out.mask, second[0])
    nce, mse = out.metrics["nce"], out.metrics["mse"]
    assert float(out.loss) == pytest.approx(float(nce + 10.0 * mse), rel=1e-6)
    assert all(math.isfinite(float(v)) for v in (out.loss, nce, mse))
    assert out.reconstruction.shape == (10, 256)


def test_a_half_of_weight_zero_is_neither_run_nor_given_a_head(fsdd_fbank):
    joint = _tiny_task(nce_weight=1.0, mse_weight=10.0)
    generative = _tiny_task(nce_weight=0.0, mse_weight=10.0)
    generative.load_state_dict(joint.state_dict(), strict=False)  # same encoder and gpredlayer
    assert not hasattr(generative, "cpredlayer") and hasattr(generative, "gpredlayer")
    assert "cpredlayer.0.weight" in joint.state_dict()
    with torch.no_grad():
        out = generative.mspm(fsdd_fbank, 10, torch.Generator().manual_seed(5))
        both = joint.mspm(fsdd_fbank, 10, torch.Generator().manual_seed(5))

    assert set(out.metrics) == {"mse"}
    assert float(out.loss) == pytest.approx(10.0 * float(out.metrics["mse"]), rel=1e-6)
    # the only pass draws the generator's first mask (the joint loss' discriminative one)
    replay = torch.Generator().manual_seed(5)
    assert torch.equal(out.mask, make_mask(4, joint.encoder.grid, 10, (2, 3), replay)[0])
    assert not torch.equal(out.mask, both.mask)

    discriminative = _tiny_task(nce_weight=1.0, mse_weight=0.0)
    assert not hasattr(discriminative, "gpredlayer")
    with torch.no_grad():
        nce_only = discriminative.mspm(fsdd_fbank, 10, torch.Generator().manual_seed(5))
    assert set(nce_only.metrics) == {"nce", "acc", "acc_raw"} and nce_only.mask is None
    assert float(nce_only.loss) == pytest.approx(float(nce_only.metrics["nce"]), rel=1e-6)


@pytest.mark.parametrize(
    ("weights", "message"),
    [((0.0, 0.0), "both 0: nothing to learn"), ((-1.0, 10.0), "nce_weight=-1.0 must be >= 0")],
)
def test_objective_weights_are_checked(weights, message):
    with pytest.raises(ValueError, match=message):
        MSPMConfig(nce_weight=weights[0], mse_weight=weights[1])


def test_validation_masks_default_to_400_of_512_patches():
    assert _tiny_task().objective.n_masked_val == round(400 / 512 * 32)
    assert PretrainTask(TINY, input_frames=1024).objective.n_masked_val == 400


# ------------------------------------------------------------------------ bad recipes
@pytest.fixture(scope="module")
def small_shards(fsdd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 real FSDD clips in data_prep's shard format: enough for a recipe to build."""
    folder = tmp_path_factory.mktemp("small_shards")
    splits = {split: [fsdd_clips(fsdd_dir, ["theo"], [take])] for split, take in SPLIT_TAKES}
    return write_shard_folder(folder, splits)


SPLIT_TAKES = [("train", 7), ("test", 2)]  # FSDD's official split: takes 0-4 are test


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--model.n_maskd=3"], "--model.n_maskd"),
        (["--model.objective.n_masked=33"], "model.objective.n_masked=33"),
        (["--model.encoder.depth=3"], "EncoderConfig.depth=3"),
        (["--model.encoder=no/such/piece.yaml"], "no/such/piece.yaml"),
        (["--data.sources=[{shards: no/such/shards}]"], "no/such/shards"),
        (["--data.val={shards: no/such/val}"], "no/such/val"),
    ],
)
def test_a_bad_recipe_stops_with_one_line_before_training(
    options, named, small_shards, tmp_path, capsys
):
    out = tmp_path / "run"
    code = pretrain_cli.main(
        ["--config", str(RECIPE), *pretrain_data_args(small_shards, out), *options]
    )

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("ssamba pretrain: error:") and named in lines[0]
    assert not out.exists(), "nothing may be written before the recipe is valid"


def test_an_unknown_key_in_a_recipe_file_is_named(small_shards, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"defaults": [str(RECIPE)], "trainer": {"max_stepz": 3}}, sort_keys=False)
    )
    code = pretrain_cli.main(
        ["--config", str(recipe), *pretrain_data_args(small_shards, tmp_path / "r")]
    )

    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "max_stepz" in lines[0]


def test_encoder_options_edit_the_recipe_piece_and_the_config_shows_the_result(capsys):
    code = pretrain_cli.main(["--config", str(RECIPE), *TINY_ARGS, "--print_config"])

    config = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    encoder = config["model"]["encoder"]
    assert (encoder["family"], encoder["depth"], encoder["embed_dim"]) == ("ssamba", 2, 64)
    # the piece's family kept, two fields set, the rest left to the family's defaults
    assert encoder["drop_path_rate"] is None and EncoderConfig(**encoder).drop_path_rate == 0.1


# ------------------------------------------------------------------------ end to end
def run_pretrain(
    args: list[str], extra_env: dict[str, str] | None = None, **popen
) -> subprocess.Popen:
    """`python -m ssamba pretrain ...` as a user runs it (1 torch thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    command = [sys.executable, "-m", "ssamba", "pretrain", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, **popen)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """Wait for a run however busy the machine is (pytest-timeout guards against hangs)."""
    _, err = process.communicate()
    return process.returncode, err or ""


def failure_report(stderr: str, tail: int = 3000) -> str:
    """What a failed multi-process run printed, for an assertion message: each rank's
    error lines first (the rank that failed first is not the one that printed last: the
    others print the teardown its death caused), then the end of the output."""
    errors = [
        line
        for line in stderr.splitlines()
        if re.match(r"\[rank\d+\]:", line) and "error" in line.lower()
    ]
    first = "\n".join(errors[:40])
    return f"rank errors:\n{first}\n--- last {tail} characters:\n{stderr[-tail:]}"


def recipe_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(RECIPE),
        *TINY_ARGS,
        *pretrain_data_args(shards, out),
        "--data.val_max_clips=64",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """TensorBoard scalars of one run folder: tag -> {step: value}; restarts resolved
    (events a resumed run rewrote are replaced by the resumed ones)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def image_tags(log_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    return events.Tags()["images"]


def read_records(path: Path) -> list[dict]:
    """BatchLog lines; a line still being written (no newline yet) is left out."""
    complete = path.read_text().rpartition("\n")[0]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def best_mse_tracker(checkpoint: dict) -> dict:
    """The state of the checkpoint callback that keeps the best `val/mse` (the CPU recipe's)."""
    return next(v for k, v in checkpoint["callbacks"].items() if "'monitor': 'val/mse'" in k)


@pytest.mark.slow
def test_fsdd_run_learns_logs_keeps_the_best_checkpoint_and_exports_the_encoder(
    fsdd_shards, tmp_path
):
    steps, every = 60, 20
    code, err = finish(
        run_pretrain(
            recipe_args(
                fsdd_shards,
                tmp_path,
                f"--trainer.max_steps={steps}",
                f"--trainer.val_check_interval={every}",
                "--trainer.log_every_n_steps=5",
                "--model.schedule.warmup_steps=10",
                f"--model.image_every_n_steps={every}",
            ),
            stderr=subprocess.PIPE,
        ),
    )
    assert code == 0, err[-3000:]
    run = tmp_path / "fsdd_tiny_cpu" / "version_0"
    logged = scalars(run)

    # the losses are finite and the reconstruction error the recipe trains falls; its
    # InfoNCE weight is 0, so that half is neither computed nor logged
    for tag in ("train/loss", "train/mse", "val/loss", "val/mse"):
        assert all(math.isfinite(v) for v in logged[tag].values()), tag
    assert not {"train/nce", "train/acc", "val/nce", "val/acc"} & set(logged)
    train = [logged["train/loss"][s] for s in sorted(logged["train/loss"])]
    assert sum(train[-3:]) / 3 < 0.85 * sum(train[:3]) / 3
    val_loss = [logged["val/loss"][s] for s in sorted(logged["val/loss"])]
    val_mse = [logged["val/mse"][s] for s in sorted(logged["val/mse"])]
    assert len(val_mse) == len(val_loss) == steps // every
    assert val_loss[-1] < val_loss[0] and val_mse[-1] < val_mse[0]
    assert val_loss == pytest.approx([10 * v for v in val_mse])  # mse_weight 10, nce 0
    assert "mspm/example" in image_tags(run)

    # checkpoints: last, and the best by validation reconstruction error
    last = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == steps
    best_files = list((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best_files) == 1
    tracker = best_mse_tracker(last)
    assert Path(tracker["best_model_path"]) == best_files[0]
    assert float(tracker["best_model_score"]) == pytest.approx(min(val_mse))

    # the run's config stands alone: the encoder piece is inlined with the overrides
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert EncoderConfig(**config["model"]["encoder"]) == TINY and config["defaults"] is None

    # the exported encoder loads without Lightning and holds the last weights
    encoder_file = run / "encoder.pt"
    torch.save(
        {
            k.removeprefix("encoder."): v
            for k, v in last["state_dict"].items()
            if k.startswith("encoder.")
        },
        tmp_path / "expected.pt",
    )
    check = f"""
import sys
sys.modules["lightning"] = sys.modules["pytorch_lightning"] = None  # importing them fails
import torch
from ssamba.models.encoder_file import load_encoder_file
encoder = load_encoder_file({str(encoder_file)!r}).encoder.eval()
expected = torch.load({str(tmp_path / "expected.pt")!r})
state = encoder.state_dict()
assert state.keys() == expected.keys()
assert all(torch.equal(state[k], expected[k]) for k in state)
assert (encoder.cfg.depth, encoder.cfg.embed_dim, encoder.cfg.input_frames) == (2, 64, 64)
with torch.no_grad():
    pooled = encoder(torch.zeros(2, 64, 128))
assert pooled.shape == (2, 64) and torch.isfinite(pooled).all()
"""
    subprocess.run([sys.executable, "-c", check], check=True, cwd=REPO)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_with_step_lr_optimizer_and_plateau(
    fsdd_shards, tmp_path
):
    # Plateau schedule with patience 0 and a learning rate too small to change any
    # prediction: every evaluation after the first fails to improve masked accuracy, so
    # the rate halves at steps 20 and 30 (evaluations at 10, 20, 30). A resume that lost
    # the plateau state would go back to the full rate.
    def args(out: Path) -> list[str]:
        return recipe_args(
            fsdd_shards,
            out,
            "--trainer.max_steps=30",
            "--trainer.val_check_interval=10",
            "--trainer.log_every_n_steps=1",
            "--model.schedule.kind=plateau",
            "--model.schedule.plateau_patience=0",
            "--model.objective.nce_weight=1.0",  # the plateau follows the masked accuracy
            "--model.lr=1e-9",
            "--model.schedule.warmup_steps=5",
            "--model.image_every_n_steps=0",
            "--trainer.callbacks+=ssamba.tasks.callbacks.BatchLog",
            "--ckpt_path=last",  # set and forget: nothing to resume on the first start
        )

    reference = run_pretrain(args(tmp_path / "reference"), stderr=subprocess.PIPE)
    interrupted = run_pretrain(args(tmp_path / "resumed"), stderr=subprocess.PIPE)
    run = tmp_path / "resumed" / "fsdd_tiny_cpu" / "version_0"
    batches = run / "batches" / "rank0.jsonl"
    # the checkpoint of step 20 is complete once the batch of step 20 has been recorded
    while not (batches.exists() and any(r["step"] >= 20 for r in read_records(batches))):
        assert interrupted.poll() is None, interrupted.communicate()[1][-3000:]
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGKILL)
    _, first_err = finish(interrupted)
    killed_at = max(r["step"] for r in read_records(batches))
    assert killed_at < 29, "the run finished before it could be interrupted"
    assert "starting from scratch" in first_err
    assert load_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 20

    code, err = finish(run_pretrain(args(tmp_path / "resumed"), stderr=subprocess.PIPE))
    assert code == 0, err[-3000:]
    ref_code, ref_err = finish(reference)
    assert ref_code == 0, ref_err[-3000:]
    assert "starting from scratch" not in err
    assert not (tmp_path / "resumed" / "fsdd_tiny_cpu" / "version_1").exists(), "same folder"

    # the resumed process continued at the checkpoint's step, up to the end
    records = read_records(batches)
    resumed = records[killed_at + 1 :]
    assert [r["step"] for r in records[: killed_at + 1]] == list(range(killed_at + 1))
    assert [r["step"] for r in resumed] == list(range(20, 30))
    # ... on fresh clips: the stream does not replay the run's first batches
    assert resumed[0]["ids"] != records[0]["ids"]

    # every step ran at the learning rate of the uninterrupted run, plateau cuts included
    resumed_lr = scalars(run)["train/lr"]
    reference_lr = scalars(tmp_path / "reference" / "fsdd_tiny_cpu" / "version_0")["train/lr"]
    assert sorted(resumed_lr) == sorted(reference_lr) == list(range(30))
    assert resumed_lr == pytest.approx(reference_lr, rel=1e-6)
    assert reference_lr[25] == pytest.approx(reference_lr[15] / 2, rel=1e-6)

    # optimizer and plateau state went on from the checkpoint, not from zero
    final = load_ckpt(run / "checkpoints" / "last.ckpt")
    reference_run = tmp_path / "reference" / "fsdd_tiny_cpu" / "version_0"
    ref_final = load_ckpt(reference_run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 30
    adam_steps = {float(s["step"]) for s in final["optimizer_states"][0]["state"].values()}
    assert adam_steps == {30.0}
    assert final["lr_plateau"] == ref_final["lr_plateau"]
    assert final["lr_plateau"]["scale"] == 0.25

    # the best checkpoint (lowest validation MSE, the recipe's monitor) is the
    # uninterrupted run's, scored over the evaluations before and after the resume
    best_steps = []
    for folder in (run, reference_run):
        (best,) = (folder / "checkpoints").glob("best-*.ckpt")
        best_steps.append(load_ckpt(best)["global_step"])
    tracker = best_mse_tracker(final)
    assert best_steps[0] == best_steps[1]
    assert float(tracker["best_model_score"]) == pytest.approx(
        min(scalars(run)["val/mse"].values())
    )


def test_a_checkpoint_of_the_previous_format_still_loads(tmp_path):
    """Checkpoints written before the objective became typed carry flat hyperparameters
    (objective "mspm", n_masked, single_pass, ignore_padding, ...): the encoder loader
    reads them as before."""
    from ssamba.models.encoder_file import load_encoder_file

    task = _tiny_task()
    old_hparams = {
        "encoder": task.encoder.cfg.to_dict(),
        "input_frames": 64,
        "objective": "mspm",
        "eat": None,
        "n_masked": 10,
        "single_pass": False,
        "ignore_padding": False,
        "warmup_steps": 1000,
        "schedule": "plateau",
    }
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": old_hparams}
    checkpoint["encoder_config"] = task.encoder.cfg.to_dict()
    torch.save(checkpoint, tmp_path / "old.ckpt")

    loaded = load_encoder_file(tmp_path / "old.ckpt").encoder
    state = task.encoder.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
