"""Image classification (task = "image-cls"): a tiny ViT on colour-coded synthetic images, end to end.

The images are 32 x 32 RGB, their class is their colour (red / green / blue) and their domain changes how
they look (plain, dark, striped), so a client per domain is feature non-IID, as in LoRA-FAIR's DomainNet
setting. Everything is real: transformers' ViT and image processor saved to a folder, parquet files with a
datasets Image column, peft, the federated simulator and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlowrank.config import ConfigError, RunConfig

REPO = Path(__file__).resolve().parent.parent
PAPER_TOML = REPO / "simulations" / "paper" / "lora_fair_domainnet_vit.toml"
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 220]])
LABELS = ["red", "green", "blue"]
DOMAINS = ["plain", "dark", "striped"]


def _images(per_class_and_domain: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels, domains = [], [], []
    for domain in DOMAINS:
        for label in range(len(LABELS)):
            for _ in range(per_class_and_domain):
                pixels = COLOURS[label] + rng.normal(0, 25, size=(32, 32, 3))
                if domain == "dark":
                    pixels = pixels * 0.5
                elif domain == "striped":
                    pixels[::4] = 255
                images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
                labels.append(label)
                domains.append(domain)
    return images, labels, domains


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """A tiny ViT + image processor folder and a colours dataset folder (train/test parquet)."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    root = tmp_path_factory.mktemp("vision")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    ViTForImageClassification(config).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=LABELS), "domain": Value("string")})
    data = root / "colours"
    data.mkdir()
    for split, per, seed in (("train", 10, 0), ("test", 4, 1)):
        images, labels, domains = _images(per, seed)
        Dataset.from_dict({"image": images, "label": labels, "domain": domains}, features=features).to_parquet(
            str(data / f"{split}.parquet")
        )
    linear = {n.rsplit(".", 1)[-1] for n, m in ViTForImageClassification(config).named_modules() if n}
    # transformers >= 5 names ViT's attention projections q_proj / v_proj; older versions query / value.
    targets = ["q_proj", "v_proj"] if "q_proj" in linear else ["query", "value"]
    return {"root": root, "model": str(root / "vit"), "dataset": str(data), "targets": targets}


def _flat(vision, tmp_path, **overrides):
    flat = {
        "name": "vision",
        "output-dir": str(tmp_path / "runs"),
        "task": "image-cls",
        "model": vision["model"],
        "dataset": vision["dataset"],
        "num-clients": 3,
        "num-rounds": 2,
        "device": "cpu",
        "data.partitioner": "by-column",
        "data.partition-column": "domain",
        "lora.r": 4,
        "lora.target-modules": vision["targets"],
        "train.local-steps": 3,
        "train.batch-size": 16,
        "train.lr": 0.01,
    }
    flat.update(overrides)
    return flat


def test_workspace_gives_pixel_values_and_one_client_per_domain(vision, tmp_path):
    from fedlowrank.runtime import get_workspace

    workspace = get_workspace(RunConfig.from_flat(_flat(vision, tmp_path)))
    assert workspace.task.label_names == LABELS and workspace.task.is_image
    # by-column: each client holds exactly one domain, all three domains covered
    domains = [set(split.train["domain"]) | set(split.validation["domain"]) for split in workspace.client_splits]
    assert all(len(d) == 1 for d in domains) and set().union(*domains) == set(DOMAINS)
    for loader in (workspace.client_train_loader(0, seed=0), workspace.test_loader(), workspace.train_loader(0)):
        batch = next(iter(loader))
        assert set(batch) == {"pixel_values", "labels"}
        b = batch["labels"].shape[0]
        assert batch["pixel_values"].shape == (b, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
        assert batch["labels"].dtype == torch.long
    # DP-SGD's path: rows of the client dataset through the workspace collator; an empty Poisson batch is empty
    dataset = workspace.client_train_dataset(1)
    rows = dataset.__getitems__([0, 1, 2])
    batch = workspace.collator(rows)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert dataset.__getitems__([]) == []


def test_lora_on_attention_query_value_with_a_trained_head_and_a_frozen_base(vision, tmp_path):
    from fedlowrank.adapters import AdapterConfigError, adapter_state, attach_lora, key_role, set_trainable
    from fedlowrank.config import LoraSettings
    from fedlowrank.models import load_model
    from fedlowrank.runtime import get_workspace

    model = get_workspace(RunConfig.from_flat(_flat(vision, tmp_path))).model
    lora_layers = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert lora_layers == set(vision["targets"])
    set_trainable(model, lora_a=True, lora_b=True, head=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(key_role(n) in ("A", "B") or ".classifier.modules_to_save." in n for n in trainable)
    assert any(".classifier.modules_to_save." in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("patch_embeddings" in n for n in frozen) and any(".base_layer." in n for n in frozen)
    state = adapter_state(model)
    assert {k for k in state if key_role(k) == "head"} == {
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }
    assert state["base_model.model.classifier.weight"].shape == (3, 32)
    # The text default (query, value) names no ViT layer in transformers >= 5: refused with the names to use.
    if vision["targets"] != ["query", "value"]:
        base = load_model(vision["model"], task="image-cls", num_labels=3)
        with pytest.raises(AdapterConfigError, match="q_proj"):
            attach_lora(base, LoraSettings(), task="image-cls")


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft asks transformers v5
def test_federated_lora_fair_per_domain_from_the_paper_config(vision, tmp_path):
    """The paper TOML with the tiny model and data: 2 rounds, bias recorded, a saved adapter that reloads."""
    from peft import PeftModel
    from transformers import AutoImageProcessor

    from fedlowrank.data import make_loader, prepare_images
    from fedlowrank.models import load_model
    from fedlowrank.report import read_metrics
    from fedlowrank.runtime import get_workspace
    from fedlowrank.training import evaluate
    from simulations.run import run_inprocess

    overrides = _flat(vision, tmp_path, **{"server-eval-every": 1, "train.batch-size": 16, "lora.alpha": 8.0})
    overrides["num-clients"] = 3  # the paper has 6 domains, the colours 3
    config = RunConfig.from_toml(PAPER_TOML, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    assert config.strategy == "lora-fair" and config.data.partitioner == "by-column"
    summary = run_inprocess(config)
    run_dir = Path(config.output_dir) / config.name
    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        assert row["clients_trained"] == 3 and row["clients_failed"] == 0
        assert row["bias_rel_mean"] >= 0 and len(row["bias_rel_per_layer"]) == 4  # 2 layers x (q, v)
        assert row["test_accuracy"] is not None and row["bytes_up"] > 0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]

    # The adapter folder holds the image processor too; plain peft reproduces the reported accuracy.
    processor = AutoImageProcessor.from_pretrained(run_dir / "adapter")
    reloaded = PeftModel.from_pretrained(
        load_model(vision["model"], task="image-cls", num_labels=3, label_names=summary["label_names"]),
        run_dir / "adapter",
    )
    test = get_workspace(config).task.test
    loader = make_loader(prepare_images(test, processor, "image", "label"), processor, 32, shuffle=False)
    result = evaluate(reloaded, loader, 3)
    assert result.accuracy == pytest.approx(summary["test_accuracy"], abs=1e-9)


def test_centralized_training_learns_the_colours(vision, tmp_path):
    from typer.testing import CliRunner

    from fedlowrank.cli import app
    from fedlowrank.report import read_metrics

    flat = _flat(vision, tmp_path, **{"num-rounds": 1, "train.local-steps": 12, "lora.alpha": 8.0})
    args = [a for k, v in flat.items() if k != "name" for a in ("--set", f"{k}={json.dumps(v)}")]
    result = CliRunner().invoke(app, ["train", *args, "--name", "central"])
    assert result.exit_code == 0, result.output
    row = read_metrics(tmp_path / "runs" / "central")[-1]
    assert row["test_accuracy"] > 0.8  # chance is 1/3
    assert (tmp_path / "runs" / "central" / "adapter" / "preprocessor_config.json").is_file()


def test_dp_sgd_trains_a_vit_client(vision, tmp_path):
    from fedlowrank.report import read_metrics
    from simulations.run import run_inprocess

    overrides = {
        "num-rounds": 1,
        "optimizer": "sgd",
        "train.lr": 0.5,
        "dp.epsilon": 8.0,
        "dp.accountant": "rdp",
        "dp.engine": "fused",
    }
    config = RunConfig.from_flat(_flat(vision, tmp_path, **overrides))
    run_inprocess(config)
    row = read_metrics(Path(config.output_dir) / config.name)[-1]
    assert row["clients_trained"] == 3 and 0 < row["dp_epsilon_max"] <= 8.0


def test_image_folder_layout_loads(tmp_path):
    from fedlowrank.config import DataSettings
    from fedlowrank.data import load_task

    images, labels, _ = _images(2, seed=3)
    for split in ("train", "test"):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = tmp_path / "folder" / split / LABELS[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    task = load_task(str(tmp_path / "folder"), "", DataSettings(), task="image-cls")
    assert sorted(task.label_names) == sorted(LABELS) and len(task.train) == len(images)
    assert task.train[0]["image"].size == (32, 32)
    # A CSV of image file paths (column "path") and class names works too.
    paths = sorted((tmp_path / "folder" / "train").rglob("*.png"))
    (tmp_path / "csv").mkdir()
    rows = [f"{path},{path.parent.name}" for path in paths]
    (tmp_path / "csv" / "train.csv").write_text("path,colour\n" + "\n".join(rows) + "\n")
    settings = DataSettings(image_column="path", label_column="colour")
    task = load_task(str(tmp_path / "csv"), "", settings, task="image-cls")
    assert task.label_names == sorted(LABELS) and task.train[0]["path"].mode == "RGB"


def test_refusals_are_clear(vision, tmp_path):
    from fedlowrank.data import DataError
    from fedlowrank.models import ModelNotFoundError, load_image_processor, load_model
    from fedlowrank.runtime import build_workspace

    with pytest.raises(ConfigError, match="engine = 'batched' supports text tasks only"):
        RunConfig.from_flat(_flat(vision, tmp_path, engine="batched"))
    with pytest.raises(ConfigError, match="needs data.partition-column"):
        RunConfig.from_flat(_flat(vision, tmp_path, **{"data.partition-column": ""}))
    with pytest.raises(DataError, match="3 distinct value.*num-clients = 3"):
        build_workspace(RunConfig.from_flat(_flat(vision, tmp_path, **{"num-clients": 2}))).client_split(0)
    with pytest.raises(DataError, match="no column.*data.image-column"):
        build_workspace(RunConfig.from_flat(_flat(vision, tmp_path, **{"data.image-column": "picture"})))
    # A hub name that cannot be loaded (offline here: local cache only) fails at once, saying what to do.
    missing = "no-such-org/no-such-vit-xyz"
    with pytest.raises(ModelNotFoundError, match="(?s)local folder.*preprocessor_config.json"):
        load_image_processor(missing)
    with pytest.raises(ModelNotFoundError, match="(?s)local folder.*preprocessor_config.json"):
        load_model(missing, task="image-cls", num_labels=3)
    with pytest.raises(ModelNotFoundError, match="could not load model"):
        build_workspace(RunConfig.from_flat(_flat(vision, tmp_path, model=missing)))
