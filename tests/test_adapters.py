import pytest
import torch
from peft import PeftModel

from fedlowrank.adapters import (
    AdapterConfigError,
    adapter_state,
    attach_lora,
    count_parameters,
    key_role,
    load_adapter_state,
    lora_factors,
    set_trainable,
)
from fedlowrank.config import LoraSettings
from fedlowrank.models import ModelNotFoundError, load_model, load_tokenizer


@pytest.fixture(scope="module")
def peft_model():
    torch.manual_seed(0)
    return attach_lora(load_model("minilm", num_labels=6), LoraSettings(r=4, target_modules=["query", "value"]))


def test_factors_pair_per_layer_with_peft_shapes(peft_model):
    factors = lora_factors(adapter_state(peft_model))
    assert len(factors) == 12  # 6 layers x (query, value)
    for pair in factors.values():
        assert pair.A.shape == (4, 384) and pair.B.shape == (384, 4)
        assert torch.count_nonzero(pair.B) == 0  # peft init: B = 0
        assert torch.count_nonzero(pair.A) > 0
    heads = sorted(k for k in adapter_state(peft_model) if key_role(k) == "head")
    assert heads == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]


def test_adapter_state_round_trips_and_changes_the_model(peft_model):
    original = adapter_state(peft_model)
    generator = torch.Generator().manual_seed(1)
    random_state = {k: torch.randn(v.shape, generator=generator) for k, v in original.items()}
    load_adapter_state(peft_model, random_state)
    read_back = adapter_state(peft_model)
    assert read_back.keys() == random_state.keys()
    for key in random_state:
        torch.testing.assert_close(read_back[key], random_state[key], rtol=0, atol=0)
    # the copy is detached: editing it does not touch the model
    read_back[next(iter(read_back))].add_(1.0)
    assert torch.equal(adapter_state(peft_model)[next(iter(read_back))], random_state[next(iter(read_back))])
    load_adapter_state(peft_model, original)


def test_partial_and_bad_states(peft_model):
    state = adapter_state(peft_model)
    one_key = dict([next(iter(state.items()))])
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state(peft_model, one_key)
    load_adapter_state(peft_model, one_key, strict=False)
    with pytest.raises(KeyError, match="does not know"):
        load_adapter_state(peft_model, {"nope.lora_A.weight": torch.zeros(1)}, strict=False)
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(peft_model, {key: torch.zeros(3, 3)}, strict=False)


def test_freezing_a_or_b_and_counting(peft_model):
    lora_params = 12 * (4 * 384 + 384 * 4)
    head_params = 384 * 6 + 6
    set_trainable(peft_model, lora_a=True, lora_b=True, head=True)
    full = count_parameters(peft_model)
    assert full.trainable == lora_params + head_params
    assert full.trainable_bytes == 4 * full.trainable
    set_trainable(peft_model, lora_a=False, lora_b=True, head=False)
    assert count_parameters(peft_model).trainable == lora_params // 2
    trainable_keys = adapter_state(peft_model, trainable_only=True).keys()
    assert trainable_keys and all(".lora_B." in k for k in trainable_keys)
    set_trainable(peft_model, lora_a=True, lora_b=False, head=True)
    assert all(".lora_B." not in k for k in adapter_state(peft_model, trainable_only=True))
    set_trainable(peft_model)


def test_head_can_stay_frozen():
    model = attach_lora(load_model("minilm", num_labels=6), LoraSettings(r=2, train_head=False))
    assert count_parameters(model).trainable == 12 * (2 * 384 * 2)


def test_rank_larger_than_the_layer_is_refused():
    with pytest.raises(AdapterConfigError, match="r=500 is larger.*384 x 384"):
        attach_lora(load_model("minilm", num_labels=6), LoraSettings(r=500))


def test_unknown_target_module_lists_real_names():
    with pytest.raises(AdapterConfigError, match="q_proj.*query"):
        attach_lora(load_model("minilm", num_labels=6), LoraSettings(target_modules=["q_proj"]))


def test_saved_adapter_loads_with_peft_and_reproduces_logits(peft_model, tmp_path):
    generator = torch.Generator().manual_seed(2)
    state = {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in adapter_state(peft_model).items()}
    load_adapter_state(peft_model, state)
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer = load_tokenizer("minilm")
    batch = tokenizer(["What is the capital of France ?", "Who wrote Hamlet ?"], padding=True, return_tensors="pt")
    peft_model.eval()
    expected = peft_model(**batch).logits
    reloaded = PeftModel.from_pretrained(load_model("minilm", num_labels=6), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(**batch).logits, expected)


def test_unknown_model_says_how_to_use_local_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="local folder"):
        load_model("no-such-org/no-such-model-xyz", num_labels=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"), num_labels=2)


def test_causal_lm_loads_from_a_local_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny-llama")
    model = load_model(str(tmp_path / "tiny-llama"), task="causal-lm")
    peft_model = attach_lora(model, LoraSettings(r=2, target_modules=["q_proj", "v_proj"]), task="causal-lm")
    assert len(lora_factors(adapter_state(peft_model))) == 2
    assert not [k for k in adapter_state(peft_model) if key_role(k) == "head"]


@pytest.mark.parametrize("adapter", ["lora", "vera"])
def test_fast_state_access_agrees_with_peft_state_dicts(adapter):
    """adapter_state / load_adapter_state use the live tensors; peft's own state-dict calls see the same values."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    torch.manual_seed(0)
    model = attach_lora(
        load_model("minilm", num_labels=6), LoraSettings(adapter=adapter, r=4, target_modules=["query", "value"])
    )
    generator = torch.Generator().manual_seed(3)
    peft_keys = get_peft_model_state_dict(model)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in adapter_state(model).items()}
    assert set(state) == set(peft_keys)
    load_adapter_state(model, state)
    for key, value in get_peft_model_state_dict(model).items():
        assert torch.equal(value.float(), state[key]), key
    again = {k: v + 1 for k, v in state.items()}
    set_peft_model_state_dict(model, again)
    assert all(torch.equal(adapter_state(model)[k], again[k]) for k in again)


def test_a_saved_text_classifier_of_other_labels_gets_a_new_head(tmp_path):
    """A local checkpoint with a 6-way head (e.g. fine-tuned on TREC) loads for a 2-class task: the body is
    kept, the head is replaced by a fresh one of the new size."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=6)  # fmt: skip
    torch.manual_seed(0)
    saved = BertForSequenceClassification(config)
    saved.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), num_labels=2)
    assert loaded.classifier.out_features == 2 and loaded.config.num_labels == 2
    torch.testing.assert_close(loaded.bert.pooler.dense.weight, saved.bert.pooler.dense.weight)
