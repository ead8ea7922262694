"""Distillation modes on the shared core: teacher assistants and born-again generations (stages), with the real
MiniLM teacher and Rotten Tomatoes reviews, and a tiny LM with SmolLM2's tokenizer."""

from __future__ import annotations

import pytest
import torch

from distill_core import steps
from distill_core.errors import RecipeError
from distill_core.model_io import load_teacher
from distill_core.recipe import parse_recipe
from distill_core.soft_labels import generate_soft_labels
from distill_core.store import LocalStore
from distill_core.tasks import CLASSIFICATION

ASSISTANT = {"name": "ta", "family": "transformer", "teacher_layers": [0, 2]}
SMALL = {"name": "tf", "family": "transformer", "teacher_layers": [1], "embedding_dim": 32, "lr": 3e-4}
BAG = {"name": "bag", "family": "embedding_bag", "buckets": 4096, "dim": 16, "lr": 0.05}


def _recipe(**fields):
    return parse_recipe(
        {
            "name": "modes",
            "data": {"max_rows": 300, "augment_copies": 1},
            "students": [SMALL],
            "stages": {"assistants": [ASSISTANT], "generations": 2},
            "train": {"max_steps": 10, "batch_size": 16, "eval_every": 5, "checkpoint_every": 5, "lr": 3e-4},
            "evaluation": {"latency_samples": 5, "throughput_batch": 8, "hard_label_baseline": False},
            **fields,
        }
    )


@pytest.mark.parametrize(
    ("stages", "problem"),
    [
        ({"generations": 0}, "stages.generations: Input should be greater than or equal to 1"),
        ({"assistants": [{"name": "ta", "family": "embedding_bag"}]}, "assistant 'ta' is an embedding_bag"),
        ({"assistants": [{"name": "ta", "family": "transformer", "teacher_layers": [0]}]}, "'tf' has teacher_layers"),
        ({"assistants": [{"name": "tf", "family": "transformer"}]}, "names must be unique, repeated: ['tf']"),
    ],
)
def test_a_stage_that_cannot_be_made_is_refused_naming_the_field(stages, problem):
    with pytest.raises(RecipeError) as err:
        parse_recipe({"name": "x", "students": [SMALL], "stages": stages})
    assert problem in str(err.value)


def test_an_lm_assistant_with_factorised_embeddings_is_refused():
    assistant = {"name": "ta", "family": "transformer", "teacher_layers": [0, 1], "embedding_dim": 16}
    with pytest.raises(RecipeError, match=r"stages.assistants \['ta'\].*drop embedding_dim"):
        parse_recipe({"name": "x", "task": "causal_lm", "students": [SMALL], "stages": {"assistants": [assistant]}})


@pytest.mark.parametrize("embedding_dim", [None, 32])
def test_a_student_cut_whole_from_a_pruned_or_factorised_assistant_computes_what_the_assistant_does(
    registered_teacher, tracking_uri, small_dataset, embedding_dim
):
    """Cutting through the assistant's vocabulary map and embedding factors: a student given every layer of the
    assistant is the assistant, logit for logit, on the texts it was cut for."""
    teacher = load_teacher(*registered_teacher, tracking_uri).module
    texts, _ = CLASSIFICATION.examples(small_dataset, "transfer")
    recipe = _recipe()
    assistant_cfg = recipe.stages.assistants[0].model_copy(update={"embedding_dim": embedding_dim})
    assistant = CLASSIFICATION.build_student(assistant_cfg, teacher, small_dataset, texts, recipe.soft_labels, print)
    whole = SMALL | {"teacher_layers": [0, 1], "embedding_dim": None}
    student = CLASSIFICATION.build_student(
        parse_recipe({"name": "x", "students": [whole]}).students[0],
        assistant,
        small_dataset,
        texts[:40],
        recipe.soft_labels,
        print,
    )
    assert student.encoder.embeddings.word_embeddings.weight.shape[0] < assistant.id_map.numel()  # pruned again
    with torch.no_grad():
        a = assistant.eval()(**assistant.tokenize(texts[:40]))
        b = student.eval()(**student.tokenize(texts[:40]))
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_stages_train_in_order_and_a_run_killed_in_one_resumes_there_reusing_the_finished_ones(
    registered_teacher, tracking_uri, small_dataset, tmp_path
):
    recipe = _recipe(students=[BAG])  # a bag after the transformer assistant: its generations train in a moment
    teacher = load_teacher(*registered_teacher, tracking_uri)
    labels = generate_soft_labels(teacher, small_dataset, recipe.soft_labels, LocalStore(tmp_path / "store"))

    whole = steps.distill_all(recipe, small_dataset, labels, teacher, tmp_path / "whole", log=lambda _: None)
    (outcome,) = whole
    assert [(s.name, s.role) for s in outcome.stages] == [("ta", "assistant"), ("bag.gen1", "generation")]
    assert len(outcome.stages[0].result.student.encoder.encoder.layer) == 2

    said: list[str] = []

    def dies_in_the_last_generation(line: str) -> None:
        said.append(line)
        if sum(s.startswith("training bag (distilled") for s in said) == 2 and line.startswith("step 10/10"):
            raise KeyboardInterrupt("killed")  # at its last evaluation: its step 5 was checkpointed

    with pytest.raises(KeyboardInterrupt):
        steps.distill_all(recipe, small_dataset, labels, teacher, tmp_path / "killed", log=dies_in_the_last_generation)
    said.clear()
    (resumed,) = steps.distill_all(recipe, small_dataset, labels, teacher, tmp_path / "killed", log=said.append)
    resumes = [line for line in said if line.startswith("resumed")]
    assert resumes == [
        "resumed from checkpoint at step 10 (training had finished)",  # the assistant
        "resumed from checkpoint at step 10 (training had finished)",  # generation 1
        "resumed from checkpoint at step 5",  # the candidate, where it died
    ]
    for a, b in zip(outcome.distilled.student.state_dict().values(), resumed.distilled.student.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)

    reports = steps.evaluate_all(recipe, small_dataset, labels, teacher, whole)
    assert [r.name for r in reports][1:] == ["ta (assistant)", "bag.gen1", "bag (distilled)"]
    steps.save_students(tmp_path / "saved", whole)  # the DVC stages: train writes, evaluate reads
    (loaded,) = steps.load_students(tmp_path / "saved", recipe)
    assert [s.name for s in loaded.stages] == ["ta", "bag.gen1"]
    assert loaded.stages[1].result.history == outcome.stages[1].result.history


def test_a_warm_start_trains_on_the_rows_whose_signal_moved_plus_a_seeded_replay_of_the_rest():
    from distill_core.warm import moved_rows

    recipe = _recipe(stages={}, warm_start={"changed": 0.1, "replay": 0.25})
    old = torch.zeros(100, 2).numpy()
    new = old.copy()
    new[:10, 0] = 3.0  # rows 0..9: p(class 0) 0.5 -> 0.95, a total variation of 0.45
    new[10:20, 0] = 0.1  # rows 10..19 moved by 0.025: below the threshold
    rows, moved = moved_rows(recipe, old, new)
    assert moved == 10 and set(range(10)) <= set(rows.tolist())
    assert len(rows) == 10 + round(0.25 * 90) and list(rows) == sorted(rows)
    again, _ = moved_rows(recipe, old, new)
    assert again.tolist() == rows.tolist()  # seeded: a rerun trains on the same rows


def test_the_dvc_stages_refuse_a_warm_start_that_names_no_student_version(small_dataset, tmp_path):
    from distill_core.settings import load_settings
    from distill_core.soft_labels import SoftLabels

    recipe = _recipe(stages={}, warm_start={})
    labels = SoftLabels("k", {"transfer": torch.zeros(3, 2).numpy()}, {}, reused=False)
    with pytest.raises(RecipeError, match="warm_start.version is not set: the DVC stages start from a pinned"):
        steps.warm_start(recipe, load_settings(tmp_path), small_dataset, labels, pinned=True)


def test_a_warm_start_and_stages_together_are_refused():
    with pytest.raises(RecipeError, match="warm_start and stages"):
        _recipe(warm_start={})


def test_ensemble_members_that_predict_different_labels_are_refused_naming_both(small_dataset):
    from toy_models import BagTeacher, WordHashTokenizer

    from distill_core.ensemble import Member, ensemble_of
    from distill_core.errors import TeacherError
    from distill_core.modules import LoadedTeacher, WrappedTeacher

    def member(name, labels):
        module = WrappedTeacher(BagTeacher(), WordHashTokenizer(), labels=labels)
        return Member(LoadedTeacher(module, name, "1", name), 1.0)

    with pytest.raises(
        TeacherError, match=r"teachers a v1 \(weight 1\) and b v1 \(weight 1\) predict different labels"
    ):
        ensemble_of([member("a", ("neg", "pos")), member("b", ("pos", "neg"))])
    both = ensemble_of([member("a", ("neg", "pos")), member("b", ("neg", "pos"))])
    texts = ["a fine film", "a dull one"]
    probs = [torch.softmax(m(**m.tokenize(texts)), -1) for m in both.module.members]
    mixed = torch.exp(both.module(**both.module.tokenize(texts)))
    assert torch.allclose(mixed, (probs[0] + probs[1]) / 2, atol=1e-6)


def test_a_qualify_rule_names_one_tag_or_one_alias_and_says_why_a_version_does_not_qualify():
    with pytest.raises(RecipeError, match="qualify: give one of tag and alias"):
        parse_recipe({"name": "x", "students": [SMALL], "qualify": {"tag": "a", "alias": "b"}})
    rule = parse_recipe({"name": "x", "students": [SMALL], "qualify": {"tag": "stage=ready"}}).qualify
    assert rule.problem({"stage": "ready"}, set()) is None
    assert rule.problem({"stage": "draft"}, set()) == "its tag 'stage' is 'draft', not 'ready'"
    assert rule.problem({}, {"production"}) == "it has no tag 'stage'"


def test_the_dvc_stages_refuse_an_ensemble_whose_members_are_not_pinned(tmp_path):
    from distill_core.settings import load_settings

    teachers = [{"name": "a", "version": 2}, {"name": "b"}, {"name": "c", "last": 2}]
    recipe = parse_recipe({"name": "x", "students": [SMALL], "teachers": teachers})
    with pytest.raises(RecipeError, match=r"teachers.1, teachers.2: the DVC stages distill pinned teachers"):
        steps.recipe_teacher(recipe, load_settings(tmp_path), "", "")
