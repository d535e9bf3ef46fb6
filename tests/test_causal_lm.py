"""Federated instruction tuning of causal LMs on tiny config-built Llama, Qwen2 and GPT-2 models (random
weights, a character tokenizer): response-only loss masks, GSM8K answers, learning centrally and federated,
DP-SGD, the batched engine and reloading a saved adapter with plain peft."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import fixed_dp_plan

from fedlowrank.adapters import adapter_state, load_adapter_state, set_trainable
from fedlowrank.config import RunConfig, TrainSettings
from fedlowrank.errors import DataError
from fedlowrank.instructions import (
    IGNORE_INDEX,
    InstructionCollator,
    answers_match,
    detect_format,
    encode_example,
    final_answer,
)
from fedlowrank.tiny_models import BOS_FAMILIES, FAMILIES, save_tiny_decoder, write_addition_task
from fedlowrank.training import per_example_loss

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {family: save_tiny_decoder(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def addition(tmp_path_factory):
    return write_addition_task(tmp_path_factory.mktemp("addition"), train=400, test=40)


def lm_config(model, dataset, tmp_path, **overrides) -> RunConfig:
    flat = {
        "task": "causal-lm",
        "model": str(model),
        "dataset": str(dataset),
        "name": "lm",
        "output-dir": str(tmp_path / "runs"),
        "num-clients": 2,
        "num-rounds": 1,
        "data.partitioner": "iid",
        "data.max-length": 48,
        "data.min-partition-size": 1,
        "train.batch-size": 16,
        "train.local-steps": 2,
        "train.lr": 3e-3,
        "train.max-new-tokens": 10,
        "train.generate-examples": 40,
        "lora.r": 16,
        "lora.alpha": 32.0,
        "device": "cpu",
    }
    flat.update(overrides)
    return RunConfig.from_flat(flat)


# ---- tokens and masks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_mask_covers_exactly_the_response_and_eos(decoders, family):
    from fedlowrank.models import load_tokenizer

    tokenizer = load_tokenizer(str(decoders[family]))
    prompt, response = "Question: What is 12 + 1?\nAnswer: ", "#### 13"
    example = encode_example(prompt, response, tokenizer, max_length=64)
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert (prompt_ids[0] == tokenizer.bos_token_id) == (family in BOS_FAMILIES)  # Llama-style BOS, or none
    assert example["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
    for position, (token, label) in enumerate(zip(example["input_ids"], example["labels"], strict=True)):
        expected = IGNORE_INDEX if position < len(prompt_ids) else token
        assert label == expected, (position, token, label)
    assert [t for t in example["labels"] if t != IGNORE_INDEX] == response_ids + [tokenizer.eos_token_id]
    # padding: right side, labels -100 and attention 0 on every pad
    short = encode_example("Q?", "#### 1", tokenizer, max_length=64)
    batch = InstructionCollator(tokenizer.pad_token_id)([example, short])
    pads = batch["attention_mask"][1] == 0
    assert int(pads.sum()) == len(example["input_ids"]) - len(short["input_ids"])
    assert bool((batch["labels"][1][pads] == IGNORE_INDEX).all())
    assert bool((batch["input_ids"][1][pads] == tokenizer.pad_token_id).all())


def test_a_byte_level_bpe_sees_the_response_as_running_text():
    """Tokenized whole, " 72" after "Answer:" is the one token running text has, not a lone space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [f"Question: what is {n}?\nAnswer: {n} apples. #### {n}" for n in range(60, 90)] * 5
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    prompt, response = detect_format(["question", "answer"]).render(
        {"question": "what is 72?", "answer": "72 apples. #### 72"}, tokenizer
    )
    example = encode_example(prompt, response, tokenizer, max_length=64)
    whole = tokenizer(prompt + response)["input_ids"]
    assert example["input_ids"] == whole + [tokenizer.eos_token_id]  # exactly the running text's tokens
    learned = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(learned[:-1]) == response == " 72 apples. #### 72"
    assert tokenizer.convert_ids_to_tokens(learned[0]) != "Ġ"  # the space is part of the first response token


def test_truncation_keeps_the_response_and_the_end_of_the_prompt(decoders):
    from fedlowrank.models import load_tokenizer

    tokenizer = load_tokenizer(str(decoders["llama"]))
    prompt, response = "x" * 100 + "Answer: ", "#### 42"
    example = encode_example(prompt, response, tokenizer, max_length=24)
    assert len(example["input_ids"]) == 24
    assert example["input_ids"][0] == tokenizer.bos_token_id  # BOS kept
    learned = [t for t in example["labels"] if t != IGNORE_INDEX]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert learned == response_ids + [tokenizer.eos_token_id]  # the whole response and EOS
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert example["input_ids"][1 : 24 - len(learned)] == prompt_ids[-(23 - len(learned)) :]  # the prompt's end
    # a response longer than the room left: the prompt keeps half, the response its start
    long = encode_example("Q: " * 20, "7" * 100, tokenizer, max_length=20)
    assert len(long["input_ids"]) == 20 and long["labels"].count(IGNORE_INDEX) == 10


def test_row_formats_are_detected_and_rendered(decoders):
    from fedlowrank.models import load_tokenizer

    tokenizer = load_tokenizer(str(decoders["gpt2"]))
    gsm = detect_format(["question", "answer"])
    assert gsm.render({"question": "2+2?", "answer": "#### 4"}, tokenizer) == ("Question: 2+2?\nAnswer:", " #### 4")
    alpaca = detect_format(["instruction", "input", "output"])
    with_input = alpaca.render({"instruction": "Add", "input": "2 and 2", "output": "4"}, tokenizer)
    without = alpaca.render({"instruction": "Add", "input": "", "output": "4"}, tokenizer)
    assert "### Input:\n2 and 2" in with_input[0] and "### Input" not in without[0]
    assert with_input[0].endswith("### Response:\n") and with_input[1] == "4"  # after a newline: no space
    chat = detect_format(["messages"])
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert chat.render({"messages": messages}, tokenizer) == ("User: hi\nAssistant: ", "hello")  # no template
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert chat.render({"messages": messages}, tokenizer) == ("<user>hi<assistant>", "hello")
    custom = detect_format(["q", "a"], "q", "a", template="Q: {prompt} -> ")
    assert custom.render({"q": "x", "a": "y"}, tokenizer) == ("Q: x -> ", "y")
    with pytest.raises(DataError, match="prompt-column"):
        detect_format(["text", "label"])
    with pytest.raises(DataError, match="not columns"):
        detect_format(["q", "a"], "q", "a", template="{nope}")


# ---- GSM8K answers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### 1,000", "1000"),
        ("#### -3", "-3"),
        ("#### 0.50", "0.5"),
        ("#### 12.0", "12"),
        ("#### $1,234.5", "1234.5"),
        ("#### 5 apples", "5"),
        ("#### 3\nQuestion: more? #### 8", "3"),  # the first mark: the rest is a model rambling on
        ("#### .5", "0.5"),
        ("#### 007", "7"),
        ("#### 1,000.00", "1000"),
        ("no mark 7", None),
        ("#### none", None),
    ],
)
def test_final_answer_parsing(text, number):
    assert final_answer(text) == number


def test_every_shipped_gsm8k_answer_parses_to_its_number(data_dir):
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines() if line]
    tails = [row["answer"].rsplit("####", 1)[1].strip() for row in rows]
    assert any("," in t for t in tails) and any(t.startswith("-") for t in tails)  # the hard cases are there
    for row, tail in zip(rows, tails, strict=True):
        parsed = final_answer(row["answer"])
        assert parsed is not None and float(parsed) == float(tail.replace(",", "")), (tail, parsed)
        assert answers_match(f"blah\n#### {tail}", row["answer"])
    assert not answers_match("#### 71", "#### 72") and not answers_match("72", "#### 72")


def test_gsm8k_loads_as_instruction_data_and_refuses_label_skew(data_dir, tmp_path):
    from fedlowrank.runtime import load_run_task

    config = lm_config("gpt2", "gsm8k", tmp_path, **{"data-dir": str(data_dir), "data.max-train-examples": 50})
    task = load_run_task(config)
    assert task.is_instruction and task.instruction_format.prompt_column == "question"
    assert len(task.train) == 50 and len(task.test) == 1319
    skewed = lm_config("gpt2", "gsm8k", tmp_path, **{"data-dir": str(data_dir), "data.partitioner": "dirichlet"})
    with pytest.raises(DataError, match="partitioner 'dirichlet'.*iid"):
        load_run_task(skewed)


# ---- the loss --------------------------------------------------------------------------------------------
def test_per_example_loss_is_the_summed_response_token_loss_float64():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6), generator=generator)
    labels[0, :4] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX
    got = per_example_loss(logits, labels)
    for i in range(3):
        expected = 0.0
        for t in range(5):  # position t predicts token t + 1
            if labels[i, t + 1] != IGNORE_INDEX:
                expected -= float(torch.log_softmax(logits[i, t], dim=-1)[labels[i, t + 1]])
        assert float(got[i]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


# ---- learning --------------------------------------------------------------------------------------------
def test_centralized_tuning_learns_the_task_and_the_adapter_reloads_with_plain_peft(decoders, addition, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlowrank.centralized import train_centralized
    from fedlowrank.instructions import encode_prompt, generate_responses
    from fedlowrank.runtime import get_workspace

    config = lm_config(
        decoders["llama"], addition, tmp_path, **{"train.local-steps": 300, "lora.target-modules": ALL_LINEAR}
    )
    workspace = get_workspace(config)
    load_adapter_state(workspace.model, workspace.initial_state)
    before = workspace.score("test", generate=True)
    summary = train_centralized(config)
    assert before.exact_match <= 0.05
    assert summary["test_exact_match"] >= 0.5, summary
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]))
    saved = json.loads((Path(summary["run_dir"]) / "generations.json").read_text())
    assert saved["round"] == 1 and saved["samples"][0]["reference"].startswith(" #### ")
    # plain peft on the saved folder generates the same tokens
    prompts = [encode_prompt(f"Question: What is {a} + 1?\nAnswer:", workspace.tokenizer, 48) for a in (23, 57, 89)]
    ours = generate_responses(workspace.model, workspace.tokenizer, prompts, 10, 3)
    base = AutoModelForCausalLM.from_pretrained(str(decoders["llama"]))
    reloaded = PeftModel.from_pretrained(base, summary["adapter"]).eval()
    assert generate_responses(reloaded, workspace.tokenizer, prompts, 10, 3) == ours


@pytest.mark.parametrize(("strategy", "lr"), [("fedit", 3e-3), ("fedsa", 3e-3), ("ffa", 1e-2)])
def test_federated_tuning_learns_the_task(decoders, addition, tmp_path, strategy, lr):
    from simulations.run import run_inprocess

    config = lm_config(
        decoders["llama"],
        addition,
        tmp_path,
        strategy=strategy,
        **{"num-rounds": 3, "train.local-steps": 80, "train.lr": lr, "lora.target-modules": ALL_LINEAR},
    )
    summary = run_inprocess(config)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert summary["test_exact_match"] >= 0.4, (strategy, summary)
    assert all("test_perplexity" in row for row in rows if "test_loss" in row)


@pytest.mark.parametrize("strategy", ["fedit", "ffa", "fedsa", "fedsvd", "lora-fair", "fedex", "flora", "flexlora"])
def test_every_method_runs_a_round_on_gpt2(decoders, addition, tmp_path, strategy):
    """GPT-2's Conv1D projections (weights stored transposed) under every method, FedEx's residual included."""
    from simulations.run import run_inprocess

    summary = run_inprocess(lm_config(decoders["gpt2"], addition, tmp_path, strategy=strategy))
    assert math.isfinite(summary["test_loss"]) and summary["test_exact_match"] is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gets_its_attention_targets_and_fedex_folds_its_residual(decoders, addition, tmp_path, family):
    """Left at the encoder default, targets become the family's attention projections; FedEx's residual
    (W - W0, in each layer's own orientation: transposed for GPT-2's Conv1D) is saved beside the adapter."""
    from fedlowrank.runtime import get_workspace
    from simulations.run import run_inprocess

    config = lm_config(decoders[family], addition, tmp_path, strategy="fedex", **{"num-clients": 3})
    summary = run_inprocess(config)
    model = get_workspace(config).model
    adapted = {
        name[: -len(".lora_A")].rsplit(".", 1)[-1] for name, _ in model.named_modules() if name.endswith(".lora_A")
    }
    expected = {"gpt2": {"c_attn"}, "gpt_neox": {"query_key_value"}}.get(family, {"q_proj", "v_proj"})
    assert adapted == expected
    saved = Path(summary["adapter"])
    assert json.loads((saved / "adapter_config.json").read_text())["target_modules"]
    assert (saved / "base_residuals.safetensors").is_file() and math.isfinite(summary["test_loss"])


# ---- DP-SGD and the engine ------------------------------------------------------------------------------
@pytest.fixture()
def lm_workspace(decoders, addition, tmp_path):
    from fedlowrank.runtime import get_workspace

    workspace = get_workspace(lm_config(decoders["qwen2"], addition, tmp_path, **{"num-clients": 3}))
    yield workspace
    load_adapter_state(workspace.model, workspace.initial_state)
    set_trainable(workspace.model, lora_a=True, lora_b=True, head=True)


def test_dp_sgd_without_noise_or_clipping_is_plain_sgd(lm_workspace):
    """q = 1 (every example in every Poisson batch), σ = 0, C huge: the DP step is the full-batch SGD step."""
    from fedlowrank.data import make_loader
    from fedlowrank.privacy.accounting import PrivacyAccountant
    from fedlowrank.privacy.dp_sgd import train_private
    from fedlowrank.training import train_local

    ws = lm_workspace
    dataset = ws.client_train_dataset(0).select(range(12))
    settings = TrainSettings(local_steps=2, batch_size=12, lr=0.05, momentum=0.0)
    plan = dataclasses.replace(fixed_dp_plan(12, 1.0, batch_size=12, local_steps=2), noise_multiplier=0.0)
    assert plan.sample_rate == 1.0
    train_private(
        ws.model,
        dataset,
        ws.collator,
        settings,
        plan,
        PrivacyAccountant(),
        max_grad_norm=1e6,
        seed=3,
        check_budget=False,
    )
    private = adapter_state(ws.model)
    load_adapter_state(ws.model, ws.initial_state)
    loader = make_loader(dataset, ws.tokenizer, 12, shuffle=False, token_labels=True)
    train_local(ws.model, loader, settings, "sgd", seed=3)
    plain = adapter_state(ws.model)
    assert sum(float((plain[k] - ws.initial_state[k]).norm()) for k in plain) > 0
    for key in plain:
        moved = float((plain[key] - ws.initial_state[key]).norm())
        error = float((private[key] - plain[key]).norm())
        assert error <= 1e-3 * moved + 1e-7, (key, error, moved)


def test_per_example_clipping_bounds_each_examples_summed_token_loss_gradient(lm_workspace):
    """Opacus' per-sample gradients on a decoder are those of each example's own summed token loss, and the
    clipped ones are within C."""
    from opacus.grad_sample import GradSampleHooks

    from fedlowrank.privacy.dp_sgd import per_example_loss_sum

    ws = lm_workspace
    rows = [ws.client_train_dataset(0)[i] for i in range(4)]
    batch = ws.collator(rows)
    params = [p for p in ws.model.parameters() if p.requires_grad]
    singles = []
    for row in rows:  # each example alone, by autograd
        grads = torch.autograd.grad(per_example_loss_sum(ws.model, ws.collator([row])), params)
        singles.append(torch.cat([g.flatten() for g in grads]))
    hooks = GradSampleHooks(ws.model, batch_first=True, loss_reduction="sum")
    try:
        per_example_loss_sum(ws.model, batch).backward()
        samples = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)
    finally:
        hooks.cleanup()
        for p in params:
            p.grad, p.grad_sample = None, None
    clip = 0.1
    for single, sample in zip(singles, samples, strict=True):
        assert torch.allclose(sample, single, rtol=1e-3, atol=1e-6)
        clipped = sample * min(1.0, clip / float(sample.norm()))
        assert float(clipped.norm()) <= clip * (1 + 1e-6)
    assert min(float(s.norm()) for s in singles) > clip  # clipping binds: the bound is what is tested


def test_instruction_rows_collated_once_are_the_collators_batches(lm_workspace):
    """Instruction data (token labels, -100 padding) through ``PaddedRows``: the very batches of the collator."""
    from fedlowrank.data import PaddedRows, make_loader

    ws = lm_workspace
    dataset = ws.client_train_dataset(0)
    rows = PaddedRows.build(dataset, ws.collator)
    assert rows is not None
    plain = make_loader(dataset, ws.tokenizer, 4, shuffle=True, seed=2, token_labels=True)
    gathered = make_loader(dataset, ws.tokenizer, 4, shuffle=True, seed=2, token_labels=True, rows=rows)
    for want, got in zip(plain, gathered, strict=True):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("private", [False, True])
def test_batched_engine_matches_each_client_training_alone(lm_workspace, private):
    from test_engine import _sequential, _start_states

    from fedlowrank.engine import ClientJob, PlainData, PrivateData, train_batched
    from fedlowrank.privacy.accounting import PrivacyAccountant
    from fedlowrank.privacy.dp_sgd import train_private

    ws = lm_workspace
    settings = TrainSettings(local_steps=2, batch_size=8, lr=5e-3)
    starts = _start_states(ws, 3)
    if private:
        datasets = [ws.client_train_dataset(pid) for pid in range(3)]
        plans = [fixed_dp_plan(len(d), 0.8, local_steps=2) for d in datasets]
        expected = []
        for pid, start in enumerate(starts):
            load_adapter_state(ws.model, start)
            train_private(
                ws.model, datasets[pid], ws.collator, settings, plans[pid], PrivacyAccountant(), max_grad_norm=0.5,
                optimizer_kind="adamw", seed=7 + pid,
            )  # fmt: skip
            expected.append(adapter_state(ws.model))
        data = [
            PrivateData(d, ws.collator, plan, PrivacyAccountant(), 0.5) for d, plan in zip(datasets, plans, strict=True)
        ]
        seeds = [7 + pid for pid in range(3)]
    else:
        expected = _sequential(ws, starts, settings, "adamw")
        data = [PlainData(ws.client_train_loader(pid, seed=5 + pid)) for pid in range(3)]
        seeds = [5 + pid for pid in range(3)]
    load_adapter_state(ws.model, ws.initial_state)
    jobs = [ClientJob(start, d, seed) for start, d, seed in zip(starts, data, seeds, strict=True)]
    results = train_batched(ws.model, jobs, settings, "adamw")
    for k, ((state, _), want) in enumerate(zip(results, expected, strict=True)):
        for key in want:
            moved = (want[key] - starts[k][key]).norm()
            error = (state[key] - want[key]).norm()
            assert error <= 1e-4 * max(float(moved), 1e-6) + 1e-6, (k, key, float(error), float(moved))


# ---- memory options -----------------------------------------------------------------------------------
def test_bf16_base_with_gradient_checkpointing_trains_float32_adapters(decoders, addition, tmp_path):
    from fedlowrank.centralized import train_centralized
    from fedlowrank.runtime import get_workspace

    config = lm_config(
        decoders["llama"], addition, tmp_path, **{"base-dtype": "bfloat16", "gradient-checkpointing": True}
    )
    workspace = get_workspace(config)
    base = [p for n, p in workspace.model.named_parameters() if "lora_" not in n]
    adapters = [p for n, p in workspace.model.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.bfloat16 for p in base) and all(p.dtype == torch.float32 for p in adapters)
    assert workspace.model.base_model.model.is_gradient_checkpointing
    summary = train_centralized(config)
    assert math.isfinite(summary["test_loss"])
    moved = adapter_state(workspace.model)
    assert any(not torch.equal(moved[k], workspace.initial_state[k]) for k in moved if "lora_B" in k)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_is_refused_clearly_on_a_cpu(decoders, addition, tmp_path, bits):
    from fedlowrank.config import ConfigError
    from fedlowrank.runtime import build_workspace

    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        build_workspace(lm_config(decoders["llama"], addition, tmp_path, quantize=bits))


def test_fused_per_sample_gradients_equal_opacus_hooks_on_a_decoder(lm_workspace):
    from fedlowrank.privacy.accounting import PrivacyAccountant
    from fedlowrank.privacy.dp_sgd import train_private

    ws = lm_workspace
    dataset = ws.client_train_dataset(0)
    settings = TrainSettings(local_steps=2, batch_size=8, lr=5e-3)
    plan = fixed_dp_plan(len(dataset), 0.8, local_steps=2)
    ends = {}
    for engine in ("hooks", "fused"):
        load_adapter_state(ws.model, ws.initial_state)
        train_private(
            ws.model, dataset, ws.collator, settings, plan, PrivacyAccountant(), max_grad_norm=0.5, engine=engine,
            optimizer_kind="adamw", seed=4,
        )  # fmt: skip
        ends[engine] = adapter_state(ws.model)
    for key, want in ends["hooks"].items():
        moved = float((want - ws.initial_state[key]).norm())
        assert float((ends["fused"][key] - want).norm()) <= 1e-4 * moved + 1e-6, key


@pytest.mark.parametrize(
    ("strategy", "settings"),
    [
        ("fedit", {"dp.epsilon": 8.0, "dp.max-grad-norm": 1.0, "train.batch-size": 8}),  # sample-level DP-SGD
        ("fedsa", {"dp.user-noise-multiplier": 0.5, "weighting": "uniform"}),  # user-level DP
        ("flexlora", {"lora.client-ranks": [4, 16]}),  # heterogeneous ranks
        ("fedit", {"engine": "batched"}),  # the batched engine
        (
            "fed-galore",
            {"lora.target-modules": ["q_proj", "v_proj"], "galore.rank": 4, "galore.projector": "gaussian"},
        ),  # GaLore, decoder q/v
    ],
)
def test_decoder_federations_with_privacy_ranks_engine_and_galore(decoders, addition, tmp_path, strategy, settings):
    from simulations.run import run_inprocess

    config = lm_config(decoders["llama"], addition, tmp_path, strategy=strategy, **{"num-rounds": 2, **settings})
    summary = run_inprocess(config)
    assert math.isfinite(summary["test_loss"]) and summary["rounds"] == 2
    if "dp.epsilon" in settings:
        assert 0 < summary["dp_epsilon_max"] <= 8.0


def test_the_paper_config_runs_on_the_shipped_gsm8k(decoders, data_dir, tmp_path):
    """simulations/paper/fedsa_gsm8k_llama3_8b.toml with the 8B model swapped for a tiny one, 1 short round."""
    from simulations.run import run_inprocess

    paper = Path(__file__).resolve().parent.parent / "simulations" / "paper" / "fedsa_gsm8k_llama3_8b.toml"
    overrides = {
        "model": str(decoders["llama"]),
        "dataset": "gsm8k",
        "data-dir": str(data_dir),
        "output-dir": str(tmp_path),
        "num-rounds": 1,
        "base-dtype": "float32",
        "data.max-length": 200,
        "data.max-train-examples": 30,
        "data.max-test-examples": 4,
        "train.local-steps": 2,
        "train.max-new-tokens": 4,
    }
    config = RunConfig.from_toml(paper, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])
    summary = run_inprocess(config)
    assert math.isfinite(summary["test_loss"]) and 0.0 <= summary["test_exact_match"] <= 1.0


def test_settings_that_cannot_work_are_refused_up_front(decoders, addition, tmp_path):
    from fedlowrank.config import ConfigError
    from fedlowrank.runtime import build_workspace

    with pytest.raises(ConfigError, match="apply to task = 'causal-lm'"):
        RunConfig.from_flat({"task": "seq-cls", "base-dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="Opacus' hooks would record twice"):
        lm_config(decoders["llama"], addition, tmp_path, **{"gradient-checkpointing": True, "dp.epsilon": 8.0})
    # 256 positions: a 200-token prompt leaves room for 56 generated tokens, not 100
    too_long = lm_config(decoders["llama"], addition, tmp_path, **{"data.max-length": 200, "train.max-new-tokens": 100})
    with pytest.raises(ConfigError, match="make their sum <= 256"):
        build_workspace(too_long)


def test_eval_scores_do_not_depend_on_the_training_mode(decoders, addition, tmp_path):
    """Scoring switches dropout off (and restores the mode): the same loss from a model left in train mode."""
    from fedlowrank.runtime import get_workspace

    workspace = get_workspace(lm_config(decoders["gpt2"], addition, tmp_path, **{"lora.dropout": 0.5}))
    workspace.model.eval()
    reference = workspace.score("test").loss
    workspace.model.train()
    assert workspace.score("test").loss == pytest.approx(reference, rel=1e-6)
    assert workspace.model.training


@pytest.mark.slow
def test_flower_ray_simulation_gives_the_in_process_federation(decoders, addition, tmp_path):
    """A causal-LM federation under Flower's own simulation engine (what `flwr run .` starts): the same
    global adapter and exact match as the in-process path."""
    from flwr.simulation import run_simulation
    from safetensors.torch import load_file

    from clients.client_app import make_client_app
    from simulations.run import run_inprocess
    from strategies.server_app import make_server_app

    def config(name):
        return lm_config(decoders["gpt2"], addition, tmp_path, name=name, **{"num-rounds": 2, "train.local-steps": 3})

    ray = config("ray")
    run_simulation(
        server_app=make_server_app(ray),
        client_app=make_client_app(ray),
        num_supernodes=ray.num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    local = run_inprocess(config("local"))
    ray_summary = json.loads((tmp_path / "runs" / "ray" / "summary.json").read_text())
    assert ray_summary["test_exact_match"] == local["test_exact_match"]
    assert ray_summary["test_loss"] == pytest.approx(local["test_loss"], rel=1e-4)
    ray_adapter = load_file(str(tmp_path / "runs" / "ray" / "adapter" / "adapter_model.safetensors"))
    local_adapter = load_file(str(Path(local["adapter"]) / "adapter_model.safetensors"))
    for key, value in ray_adapter.items():
        torch.testing.assert_close(value, local_adapter[key], rtol=1e-3, atol=1e-5)
