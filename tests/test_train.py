"""Training: distillation fits the teacher, runs are deterministic, a killed run resumes, early stopping works."""

import numpy as np
import pytest
import torch

from distill_core.evaluate import agreement, mean_kl, predict
from distill_core.model_io import load_teacher
from distill_core.recipe import LossTerm, StudentConfig, TrainConfig
from distill_core.soft_labels import generate_soft_labels
from distill_core.store import LocalStore
from distill_core.students import build_student
from distill_core.train import TransferSet, baseline_config, train_student

BAG = StudentConfig(name="bag", family="embedding_bag", buckets=4096, dim=16, lr=0.02)
TINY = StudentConfig(name="tiny", family="transformer", teacher_layers=[5], embedding_dim=32, lr=3e-4)
KD = [LossTerm(function="forward_kl", weight=0.9, temperature=1.0), LossTerm(function="ce", weight=0.1)]


@pytest.fixture(scope="module")
def setup(registered_teacher, small_dataset, tracking_uri, tmp_path_factory):
    teacher = load_teacher(*registered_teacher, tracking_uri)
    labels = generate_soft_labels(teacher, small_dataset, _soft_cfg(), LocalStore(tmp_path_factory.mktemp("store")))
    frame = small_dataset.split("transfer")
    transfer = TransferSet(frame["text"].tolist(), frame["label"].to_numpy(), labels.signal["transfer"])
    val = small_dataset.split("validation")
    return teacher, transfer, (val["text"].tolist(), val["label"].to_numpy())


def _soft_cfg():
    from distill_core.recipe import SoftLabelConfig

    return SoftLabelConfig(batch_size=64)


def _train(setup, student_cfg, cfg, ckpt, **kwargs):
    teacher, transfer, val = setup
    torch.manual_seed(0)
    student = build_student(student_cfg, teacher.module, ("fresh", "rotten"), transfer.texts, 64)
    return train_student(
        student,
        student_cfg,
        cfg,
        transfer,
        val,
        ckpt,
        teacher=teacher.module,
        log=lambda _: None,
        fingerprint="test",
        **kwargs,
    )


def test_distillation_fits_the_teacher(setup, tmp_path):
    teacher, transfer, _ = setup
    cfg = TrainConfig(losses=KD, epochs=8, batch_size=32, eval_every=1000, patience=100)
    before = build_student(BAG, teacher.module, ("fresh", "rotten"), transfer.texts, 64)
    start = predict(before, transfer.texts)
    result = _train(setup, BAG, cfg, tmp_path)
    fitted = predict(result.student, transfer.texts)
    assert agreement(fitted, transfer.teacher_signal) > 0.9
    assert mean_kl(transfer.teacher_signal, fitted) < 0.3 * mean_kl(transfer.teacher_signal, start)
    assert [h["step"] for h in result.history] == [result.steps // 8 * (e + 1) for e in range(8)]


def test_same_seed_gives_the_same_student(setup, tmp_path):
    cfg = TrainConfig(losses=KD, epochs=1, batch_size=16, eval_every=1000)
    a = _train(setup, TINY, cfg, tmp_path / "a").student.state_dict()
    b = _train(setup, TINY, cfg, tmp_path / "b").student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_from_its_last_checkpoint(setup, tmp_path):
    cfg = TrainConfig(losses=KD, epochs=1, batch_size=16, eval_every=4, checkpoint_every=5, patience=100)
    straight = _train(setup, TINY, cfg, tmp_path / "straight")

    def crash(step: int) -> None:
        if step == 12:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        _train(setup, TINY, cfg, tmp_path / "crashy", on_step=crash)
    resumed = _train(setup, TINY, cfg, tmp_path / "crashy")
    assert resumed.resumed_from == 10
    assert resumed.steps == straight.steps
    assert resumed.history == straight.history
    a, b = straight.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_run_is_ignored(setup, tmp_path):
    cfg = TrainConfig(losses=KD, epochs=1, batch_size=64, eval_every=1000)
    _train(setup, BAG, cfg, tmp_path)
    teacher, transfer, val = setup
    student = build_student(BAG, teacher.module, ("fresh", "rotten"), transfer.texts, 64)
    result = train_student(student, BAG, cfg, transfer, val, tmp_path, fingerprint="another recipe", log=lambda _: None)
    assert result.resumed_from is None


def test_early_stopping_keeps_the_best_state(setup, tmp_path):
    cfg = TrainConfig(losses=KD, epochs=20, batch_size=16, eval_every=2, patience=2, lr=1e-9)
    result = _train(setup, BAG.model_copy(update={"lr": 1e-9}), cfg, tmp_path)
    assert result.stopped_early and result.steps < 20 * int(np.ceil(len(setup[1].texts) / 16))
    assert result.best_step == result.history[0]["step"]


def test_online_feature_and_attention_transfer(setup, tmp_path):
    losses = [*KD, LossTerm(function="feature", weight=0.5), LossTerm(function="attention", weight=0.5)]
    cfg = TrainConfig(mode="online", losses=losses, epochs=1, batch_size=16, max_steps=12, eval_every=6)
    result = _train(setup, TINY.model_copy(update={"teacher_layers": [0, 5]}), cfg, tmp_path)
    assert {"feature", "attention", "forward_kl", "ce"} <= set(result.history[-1])
    assert all(np.isfinite(h["feature"]) and h["attention"] >= 0 for h in result.history)
    teacher = setup[0].module
    assert teacher.encoder.config._attn_implementation == "sdpa"  # back to the fast kernel after training


def test_hard_label_baseline_is_the_same_loop_on_labels():
    cfg = baseline_config(TrainConfig(losses=KD, mode="online", epochs=4))
    assert [t.function for t in cfg.losses] == ["ce"] and cfg.mode == "offline" and cfg.epochs == 4


def test_a_finished_run_keeps_a_small_checkpoint_that_a_rerun_reuses(setup, tmp_path):
    """After training only the best weights stay (not the optimizer's moments: it was a 257 MB file), and a rerun
    takes the result from it without training again."""
    cfg = TrainConfig(losses=KD, epochs=1, batch_size=16, eval_every=4, checkpoint_every=5, patience=100)
    first = _train(setup, TINY, cfg, tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["final"] and "optimizer" not in state and "student" not in state
    weights = sum(t.numel() * t.element_size() for t in first.student.state_dict().values())
    assert (tmp_path / "last.pt").stat().st_size < 1.5 * weights
    trained: list[int] = []
    again = _train(setup, TINY, cfg, tmp_path, on_step=trained.append)
    assert trained == [] and again.resumed_from == first.steps and again.history == first.history
    a, b = first.student.state_dict(), again.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_bag_student_without_its_own_lr_learns_a_five_class_task(tmp_path):
    """With the recipe-wide default lr (1e-4) a bag stayed at a constant prediction on five classes; each family
    now has a default that trains."""
    rng = np.random.default_rng(0)
    cues = [["superb", "brilliant"], ["good", "nice"], ["okay", "fine"], ["poor", "weak"], ["awful", "dreadful"]]
    filler = ["the", "a", "film", "story", "plot", "acting", "scenes", "music", "of", "and", "it", "was"]
    labels = rng.integers(0, 5, 400)
    texts = [" ".join([*rng.choice(filler, 6), *rng.choice(cues[y], 2)]) for y in labels]
    cfg = StudentConfig(name="bag", family="embedding_bag", buckets=4096, dim=16)
    train = baseline_config(TrainConfig(epochs=3, batch_size=32, eval_every=1000))
    assert cfg.learning_rate(train) == 5e-3 and cfg.learning_rate(TrainConfig(lr=1e-3)) == 1e-3
    student = build_student(cfg, None, tuple("abcde"), texts, 64)  # type: ignore[arg-type]
    result = train_student(
        student, cfg, train, TransferSet(texts, labels, None), (texts[:50], labels[:50]), tmp_path, log=lambda _: None
    )
    assert float((predict(result.student, texts).argmax(1) == labels).mean()) > 0.6  # chance is about 0.2
