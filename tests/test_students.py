"""Students: a transformer built from chosen teacher layers, and a hashed n-gram bag."""

import torch

from distill_core.model_io import load_teacher
from distill_core.recipe import StudentConfig
from distill_core.students import EmbeddingBagStudent, build_student, hashed_ngrams, parameter_count


def test_transformer_student_copies_the_chosen_teacher_layers(registered_teacher, small_dataset, tracking_uri):
    teacher = load_teacher(*registered_teacher, tracking_uri).module
    texts = small_dataset.split("transfer")["text"].tolist()
    cfg = StudentConfig(name="s", family="transformer", teacher_layers=[1, 4], prune_vocab=False)
    student = build_student(cfg, teacher, small_dataset.labels, texts, 64)
    assert student.encoder.config.num_hidden_layers == 2
    for s_index, t_index in enumerate(cfg.teacher_layers):
        s_layer, t_layer = student.encoder.encoder.layer[s_index], teacher.encoder.encoder.layer[t_index]
        for (name, a), (_, b) in zip(s_layer.state_dict().items(), t_layer.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(student.head.weight, teacher.head.weight)


def test_pruned_factorised_student_is_much_smaller_and_keeps_seen_words(
    registered_teacher, small_dataset, tracking_uri
):
    teacher = load_teacher(*registered_teacher, tracking_uri).module
    texts = small_dataset.split("transfer")["text"].tolist()
    full = build_student(
        StudentConfig(name="a", family="transformer", teacher_layers=[5], prune_vocab=False),
        teacher,
        small_dataset.labels,
        texts,
        64,
    )
    small = build_student(
        StudentConfig(name="b", family="transformer", teacher_layers=[5], embedding_dim=64),
        teacher,
        small_dataset.labels,
        texts,
        64,
    )
    assert parameter_count(small) < 0.3 * parameter_count(full)
    seen = small.tokenize([texts[0]])["input_ids"][0]
    assert int(small.tokenizer.unk_token_id) not in teacher.tokenize([texts[0]])["input_ids"][0].tolist()
    unk_student_id = int(small.id_map[small.tokenizer.unk_token_id])
    assert unk_student_id not in seen.tolist()  # every wordpiece of the training text survives pruning
    unseen = small.tokenize(["zygomorphic"])["input_ids"][0]
    assert unk_student_id in unseen.tolist()


def _reconstruction_error(student, teacher) -> float:
    """Relative error of the student's embedding of every kept wordpiece against the teacher's row."""
    kept = (student.id_map != student.id_map[student.tokenizer.unk_token_id]).nonzero().flatten()
    target = teacher.encoder.embeddings.word_embeddings.weight[kept].detach()
    with torch.no_grad():
        got = student.encoder.embeddings.word_embeddings(student.id_map[kept])
    return float((got - target).norm() / target.norm())


def test_factorised_embeddings_start_from_the_teacher(registered_teacher, small_dataset, tracking_uri):
    teacher = load_teacher(*registered_teacher, tracking_uri).module
    texts = small_dataset.split("transfer")["text"].tolist()
    errors = {
        dim: _reconstruction_error(
            build_student(
                StudentConfig(name="s", family="transformer", teacher_layers=[5], embedding_dim=dim),
                teacher,
                small_dataset.labels,
                texts,
                64,
            ),
            teacher,
        )
        for dim in (32, 128, None)
    }
    assert errors[None] < 1e-6  # pruned but not factorised: the teacher's rows exactly
    assert errors[128] < errors[32] < 1.0  # truncated SVD: more rank, closer to the teacher


def test_embedding_bag_hashes_stably():
    assert hashed_ngrams("A fine film.", 2, 1000) == hashed_ngrams("a fine film.", 2, 1000)
    assert len(hashed_ngrams("a fine film", 2, 1000)) == 3 + 2
    student = EmbeddingBagStudent(("neg", "pos"), buckets=1000, dim=8, ngrams=2)
    logits = student(**student.tokenize(["a fine film", "", "dull"]))
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


def test_width_pruning_keeps_the_heads_and_channels_the_teacher_uses_most(
    registered_teacher, small_dataset, tracking_uri, monkeypatch
):
    """A student narrowed to half its heads and a quarter of its FFN channels by their activations in the teacher's
    own forward pass computes closer to the full-width student than one keeping the weakest ones; a narrowed
    student is a valid source for another (an assistant)."""
    from distill_core import width

    teacher = load_teacher(*registered_teacher, tracking_uri).module
    texts = small_dataset.split("transfer")["text"].tolist()

    def cut(**fields):  # noqa: ANN003, ANN202
        cfg = StudentConfig(name="w", family="transformer", teacher_layers=[0, 5], prune_vocab=False, **fields)
        return build_student(cfg, teacher, small_dataset.labels, texts, 64).eval()

    def hidden(student) -> torch.Tensor:  # noqa: ANN001
        with torch.no_grad():
            return student.features(**student.tokenize(texts[:64])).hidden_states[-1]

    full, strongest = hidden(cut()), cut(heads=6, ffn=384)
    layer = strongest.encoder.encoder.layer[1]
    assert layer.attention.self.query.out_features == 6 * 32 and layer.intermediate.dense.out_features == 384
    monkeypatch.setattr(width, "strongest", lambda scores, keep: torch.sort(torch.argsort(scores)[:keep]).values)
    weakest = cut(heads=6, ffn=384)
    gap_strongest = (hidden(strongest) - full).norm() / full.norm()
    gap_weakest = (hidden(weakest) - full).norm() / full.norm()
    assert gap_strongest < 0.9 * gap_weakest, (gap_strongest, gap_weakest)  # measured: 0.66 against 0.82
    monkeypatch.undo()
    from_it = build_student(
        StudentConfig(name="x", family="transformer", teacher_layers=[1]), strongest, small_dataset.labels, texts, 64
    )
    assert from_it.encoder.encoder.layer[0].intermediate.dense.out_features == 384  # it keeps the narrowed width
    assert torch.isfinite(from_it(**from_it.tokenize(texts[:4]))).all()
