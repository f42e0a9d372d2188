"""The teacher-student objective (data2vec 2.0 / EAT, an `EATConfig` as `model.objective`).

On real FSDD filterbanks: the EMA teacher takes no gradients and moves exactly by the
EMA formula, masks are inverse blocks with the asked ratio, a resumed run starts from
the checkpoint's teacher, and short CPU runs of both objectives lower their loss.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from test_datamodules import fsdd_clips, write_shard_folder

from ssamba.audio import load_audio
from ssamba.data.pretrain import PretrainDataModule
from ssamba.features import FbankConfig, FeatureConfig, clip_features
from ssamba.models.encoder import EncoderConfig
from ssamba.tasks import pretrain_cli
from ssamba.tasks.objectives.eat import EATConfig, ema_decay_at, inverse_block_mask
from ssamba.tasks.pretrain import MSPMConfig, PretrainTask, ScheduleConfig

TINY = EncoderConfig(family="ssamba", depth=2, embed_dim=32, input_frames=64)
EAT = EATConfig(top_k=1, clones=3, mask_ratio=0.75, ema_decay=0.9, ema_end_decay=0.99)


@pytest.fixture(scope="module")
def digits(fsdd_dir: Path) -> torch.Tensor:
    """8 real spoken digits as 64-frame filterbanks (floor padding): (8, 64, 128)."""
    cfg = FbankConfig(target_length=64, mean=-8.77, std=4.64, pad="floor")
    waves = [load_audio(fsdd_dir / "recordings" / f"{d}_jackson_9.wav")[0] for d in range(8)]
    return torch.stack([clip_features(w, 16000, cfg, train=False) for w in waves])


def eat_task(**overrides) -> PretrainTask:
    torch.manual_seed(0)
    options = dict(objective=EAT, lr=3e-3, schedule=ScheduleConfig("cosine", warmup_steps=0))
    return PretrainTask(TINY, **(options | overrides))


def test_the_teacher_never_receives_gradients(digits):
    task = eat_task()
    out = task.eat(task.encoder, digits, torch.Generator().manual_seed(0))
    out.loss.backward()

    teacher = list(task.eat.teacher.parameters())
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.encoder.parameters())
    optimised = {id(p) for g in task.configure_optimizers().param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher}
    assert task.eat.teacher.training is False and task.train().eat.teacher.training is False


def test_the_teacher_update_is_the_ema_of_the_student(digits):
    task = eat_task()
    with torch.no_grad():  # make student and teacher differ
        for p in task.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in task.eat.teacher.named_parameters()}
    student = dict(task.encoder.named_parameters())

    decay = task.eat.update_teacher(task.encoder, step=3)

    assert decay == pytest.approx(ema_decay_at(EAT, 3))
    assert decay == pytest.approx(0.9 + (0.99 - 0.9) * 3 / EAT.ema_anneal_steps)
    for name, param in task.eat.teacher.named_parameters():
        expected = decay * before[name] + (1 - decay) * student[name]
        torch.testing.assert_close(param, expected)
    assert ema_decay_at(EAT, EAT.ema_anneal_steps + 5) == EAT.ema_end_decay


def test_masks_keep_exactly_the_visible_share_in_blocks_and_differ_per_copy():
    mask = inverse_block_mask(4, 3, (8, 4), 0.75, 2, torch.Generator().manual_seed(1))

    assert mask.shape == (12, 32)
    assert (mask.sum(1) == 24).all()  # 25% of 32 patches stay visible
    assert len({tuple(row.tolist()) for row in mask}) > 6
    # visible patches come in 2 x 2 squares (clipped at the edges): far more of them have
    # a visible neighbour than when the same number of patches is shown at random
    scattered = torch.rand(12, 32, generator=torch.Generator().manual_seed(2)).argsort(1) >= 8
    assert _with_visible_neighbour(mask) > 0.85 > _with_visible_neighbour(scattered) + 0.1


def _with_visible_neighbour(mask: torch.Tensor) -> float:
    """Share of visible patches (on the 8 x 4 grid) with a visible 4-neighbour."""
    visible = (~mask).view(-1, 1, 8, 4).float()
    cross = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    neighbours = torch.nn.functional.conv2d(visible, cross, padding=1)
    return float(((neighbours > 0) & (visible > 0)).sum() / visible.sum())


def _train(task: PretrainTask, fbank: torch.Tensor, steps: int) -> list[float]:
    """Plain optimisation of the task's loss on one batch; the EMA teacher follows."""
    optimiser = task.configure_optimizers()
    losses = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        if task.kind == "eat":
            loss = task.eat(task.encoder, fbank, generator).loss
        else:
            loss = task.mspm(fbank, task.objective.n_masked, generator).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if task.kind == "eat":
            task.eat.update_teacher(task.encoder, step)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("objective", ["mspm", "eat"])
def test_a_short_cpu_run_lowers_the_loss(digits, objective):
    if objective == "eat":
        task = eat_task()
    else:
        torch.manual_seed(0)
        task = PretrainTask(
            TINY,
            objective=MSPMConfig(n_masked=16, cluster_sizes=(2,)),
            lr=3e-3,
            schedule=ScheduleConfig(warmup_steps=0),
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend on a shared machine
    try:
        losses = _train(task.train(), digits, steps=30)
    finally:
        torch.set_num_threads(threads)

    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


class TeacherAtStart(L.Callback):
    """The teacher's weights when training (re)starts, after any checkpoint is restored."""

    def on_train_start(self, trainer: L.Trainer, module: PretrainTask) -> None:
        self.teacher = {k: v.clone() for k, v in module.eat.teacher.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_shards(fsdd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eat_shards")
    splits = {"train": [fsdd_clips(fsdd_dir, ["theo"], [7])]}
    return write_shard_folder(folder, splits)


def _fit(shards: Path, root: Path, steps: int, ckpt: Path | None) -> TeacherAtStart:
    data = PretrainDataModule(
        [{"shards": str(shards)}],
        batch_size=4,
        steps_per_epoch=3,
        num_workers=0,
        shuffle_buffer=0,
        features=FeatureConfig(target_length=64, stats=(-8.77, 4.64), pad="floor"),
    )
    watch = TeacherAtStart()
    trainer = L.Trainer(
        max_steps=steps,
        default_root_dir=root,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[watch],
    )
    trainer.fit(eat_task(), datamodule=data, ckpt_path=ckpt)
    if ckpt is None:
        trainer.save_checkpoint(root / "stopped.ckpt")
    return watch


def test_a_resumed_run_continues_with_the_checkpoints_teacher(tiny_shards, tmp_path):
    _fit(tiny_shards, tmp_path, steps=3, ckpt=None)
    saved = torch.load(tmp_path / "stopped.ckpt", map_location="cpu", weights_only=True)
    teacher = {
        k.removeprefix("eat.teacher."): v
        for k, v in saved["state_dict"].items()
        if k.startswith("eat.teacher.")
    }
    student = {
        k.removeprefix("encoder."): v
        for k, v in saved["state_dict"].items()
        if k.startswith("encoder.")
    }
    assert teacher.keys() == student.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # it is an EMA

    resumed = _fit(tiny_shards, tmp_path, steps=4, ckpt=tmp_path / "stopped.ckpt")

    assert resumed.teacher.keys() == teacher.keys()
    for name, value in teacher.items():
        assert torch.equal(resumed.teacher[name], value), name


def test_dotted_options_edit_the_recipes_objective_and_keep_its_other_settings(capsys):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "pretrain" / "fsdd_eat_cpu.yaml"
    code = pretrain_cli.main(
        ["--config", str(recipe), "--model.objective.ema_anneal_steps=100", "--print_config"]
    )
    objective = yaml.safe_load(capsys.readouterr().out)["model"]["objective"]

    assert code == 0
    assert objective["class_path"] == "ssamba.tasks.objectives.eat.EATConfig"
    settings = objective["init_args"]
    assert settings["ema_anneal_steps"] == 100
    assert (settings["top_k"], settings["mask_ratio"], settings["ema_decay"]) == (2, 0.75, 0.99)
