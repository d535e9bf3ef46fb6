import numpy as np
import pytest
import torch

from fedlowrank.adapters import adapter_state, load_adapter_state
from fedlowrank.config import TrainSettings
from fedlowrank.runtime import get_workspace
from fedlowrank.training import evaluate, macro_f1, planned_steps, train_local


@pytest.fixture()
def workspace(tiny_config):
    return get_workspace(tiny_config(**{"data.max-train-examples": 600}))


def test_local_training_lowers_the_loss_on_real_client_data(workspace):
    load_adapter_state(workspace.model, workspace.initial_state)
    loader = workspace.client_train_loader(0, seed=1)
    before = evaluate(workspace.model, loader, workspace.task.num_labels).loss
    result = train_local(workspace.model, loader, TrainSettings(local_steps=25, batch_size=16, lr=5e-3), seed=1)
    after = evaluate(workspace.model, loader, workspace.task.num_labels).loss
    assert result.num_steps == 25
    assert after < 0.8 * before
    # only the adapter moved: the frozen base weights are untouched
    changed = adapter_state(workspace.model)
    assert any(not torch.equal(changed[k], workspace.initial_state[k]) for k in changed)


def test_training_is_deterministic_given_the_seed(workspace):
    states = []
    for _ in range(2):
        load_adapter_state(workspace.model, workspace.initial_state)
        train_local(workspace.model, workspace.client_train_loader(1, seed=7), TrainSettings(local_steps=3), seed=7)
        states.append(adapter_state(workspace.model))
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


def test_planned_steps_from_epochs_or_steps():
    assert planned_steps(TrainSettings(local_epochs=1, batch_size=32), 100) == 4
    assert planned_steps(TrainSettings(local_epochs=0.5, batch_size=32), 100) == 2
    assert planned_steps(TrainSettings(local_steps=9), 100) == 9


def test_macro_f1_matches_a_per_class_reference():
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    predictions[:100] = labels[:100]
    confusion = torch.zeros(5, 5, dtype=torch.long)
    for t, p in zip(labels, predictions, strict=True):
        confusion[t, p] += 1
    reference = []
    for c in range(5):
        tp = np.sum((labels == c) & (predictions == c))
        precision = tp / max(np.sum(predictions == c), 1)
        recall = tp / max(np.sum(labels == c), 1)
        reference.append(0 if tp == 0 else 2 * precision * recall / (precision + recall))
    assert macro_f1(confusion) == pytest.approx(float(np.mean(reference)), rel=1e-12)


def test_evaluate_agrees_with_a_manual_pass(workspace):
    loader = workspace.test_loader()
    result = evaluate(workspace.model, loader, workspace.task.num_labels)
    correct, losses, total = 0, [], 0
    workspace.model.eval()
    with torch.no_grad():
        for batch in loader:
            out = workspace.model(**batch)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            losses.append(torch.nn.functional.cross_entropy(out.logits, batch["labels"], reduction="sum"))
            total += len(batch["labels"])
    assert result.num_examples == total == 96
    assert result.accuracy == pytest.approx(correct / total)
    assert result.loss == pytest.approx(float(sum(losses)) / total, rel=1e-5)


def test_split_by_length_trims_right_padded_text_and_keeps_everything_else_whole():
    """Pieces of a padded batch: longest first, within the token budget, per-token inputs (token labels too)
    trimmed to the piece's own longest row; left-padded text and images are only split by rows."""
    from fedlowrank.training import split_by_length

    lengths = torch.tensor([2, 6, 3, 5])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    batch = {
        "input_ids": torch.arange(24).reshape(4, 6) * mask,
        "attention_mask": mask,
        "labels": torch.where(mask.bool(), 7, -100),  # causal-LM token labels (2-D)
        "weights": torch.ones(4, 6),  # 2-D but not a per-token input: never trimmed
    }
    pieces = list(split_by_length(batch, max_tokens=12))
    order = torch.cat([indices for indices, _ in pieces])
    assert order.tolist() == [1, 3, 2, 0]  # longest first, every row once
    for indices, part in pieces:
        width = int(lengths[indices].max())
        assert part["input_ids"].shape == part["labels"].shape == (len(indices), width)
        assert len(indices) * width <= 12 or len(indices) == 1
        assert torch.equal(part["input_ids"], batch["input_ids"][indices, :width])
        assert part["weights"].shape == (len(indices), 6)
    assert [len(indices) for indices, _ in pieces] == [2, 2]  # 2x6 then 2x3
    left = {"input_ids": batch["input_ids"].flip(1), "attention_mask": mask.flip(1)}
    for indices, part in split_by_length(left, max_tokens=12):
        assert part["input_ids"].shape[1] == 6  # left padding keeps its full width
        assert len(indices) == 2  # and counts it: 12 // 6 rows a piece
    images = {"pixel_values": torch.zeros(5, 3, 4, 4), "labels": torch.arange(5)}
    sizes = [len(i) for i, _ in split_by_length(images, max_tokens=2)]
    assert sizes == [2, 2, 1]
    assert [len(i) for i, _ in split_by_length(batch, max_tokens=0)] == [4]  # 0: one piece
