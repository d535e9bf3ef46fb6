"""Nothing a peer sends is unpickled or evaluated, no model runs its own code unless asked, and a node reads only
its own paths."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, RecordDict

from fedlowrank.protocol import MalformedMessage
from fedlowrank.protocol.flower import record_to_state

REPO = Path(__file__).resolve().parent.parent
CODE = [p for folder in ("fedlowrank", "strategies", "clients", "simulations") for p in (REPO / folder).rglob("*.py")]


def _calls(path: Path) -> list[tuple[str, ast.Call]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            found.append((name, node))
    return found


def test_no_pickle_eval_exec_or_unsafe_loading_in_the_code():
    offenders = []
    for path in CODE:
        text = path.read_text()
        if "import pickle" in text or "from pickle" in text or "import dill" in text:
            offenders.append(f"{path.name}: pickle")
        for name, call in _calls(path):
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name in ("eval", "exec", "pickle.load", "pickle.loads", "yaml.load", "marshal.loads"):
                offenders.append(f"{path.name}:{call.lineno} {name}")
            if name == "torch.load" and keywords.get("weights_only") != "True":
                offenders.append(f"{path.name}:{call.lineno} torch.load without weights_only=True")
            if keywords.get("allow_pickle") == "True" or keywords.get("trust_remote_code") == "True":
                offenders.append(f"{path.name}:{call.lineno} {name}({keywords})")
    assert not offenders, offenders


class _Boom:
    def __reduce__(self):  # unpickling this would write a file
        return (Path.write_text, (Path("/tmp/fedlowrank-pwned"), "pwned"))


def test_a_pickled_array_is_refused_without_being_unpickled():
    Path("/tmp/fedlowrank-pwned").unlink(missing_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Boom()], dtype=object), allow_pickle=True)
    hostile = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    with pytest.raises(MalformedMessage, match="not accepted"):
        record_to_state(ArrayRecord({"classifier.weight": hostile}))
    assert not Path("/tmp/fedlowrank-pwned").exists()


def test_models_never_run_their_own_code_unless_the_run_asks(monkeypatch):
    import transformers

    import fedlowrank.models as models

    seen = []
    original = transformers.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(models.AutoConfig, "from_pretrained", spy)
    models.load_model("minilm", num_labels=2)
    assert seen and not any(seen)  # every load says trust_remote_code=False


@pytest.mark.parametrize("key", ["../other-run", "/etc", "..", "a/b", ".hidden", "x" * 129])
def test_a_run_key_that_is_not_one_plain_folder_name_is_refused(key):
    """The run key names the run's folder in a node's state: a server cannot point a node elsewhere with it."""
    from fedlowrank.protocol import MethodSpec, TrainInstruction
    from fedlowrank.protocol import flower as wire

    good = wire.encode_instruction(TrainInstruction(1, MethodSpec(), {}, run_key="tiny-0a1b2c3d4e5f"))
    assert wire.decode_train_instruction(good).run_key == "tiny-0a1b2c3d4e5f"
    with pytest.raises(MalformedMessage, match="bad run key"):
        wire.decode_train_instruction(wire.encode_instruction(TrainInstruction(1, MethodSpec(), {}, run_key=key)))


@pytest.mark.parametrize("clients", [set(), {0}, {7, 8}, {3, 9_999}, set(range(0, 10_000, 3))])
def test_the_clients_that_trained_before_travel_as_a_bitmap(clients):
    from flwr.app import ConfigRecord

    from fedlowrank.protocol import MethodSpec, TrainInstruction
    from fedlowrank.protocol import flower as wire

    content = wire.encode_instruction(TrainInstruction(2, MethodSpec(), {}, trained_before=frozenset(clients)))
    assert wire.decode_train_instruction(content).trained_before == clients
    assert len(wire.encode_client_set(clients)) == (max(clients) // 8 + 1 if clients else 0)  # 10,000: 1,250 B
    content["config"] = ConfigRecord({**content["config"], wire.TRAINED_BEFORE: "0,1,2"})
    with pytest.raises(MalformedMessage, match="bitmap"):
        wire.decode_train_instruction(content)


def test_every_run_name_gives_a_run_key_a_node_accepts_and_no_two_runs_share_one():
    from fedlowrank.protocol import check_run_key
    from fedlowrank.report import new_run_key

    for name in ("default", "my run/β", "../../etc", "...", "x" * 300):
        keys = {new_run_key(name) for _ in range(3)}
        assert len(keys) == 3 and all(check_run_key(key) == key for key in keys), keys


def test_a_node_never_reads_paths_the_submitter_sent(tmp_path):
    from clients.node import resolve_config
    from clients.state import state_store

    submitted = {"data-dir": "/submitted/data", "client-state": "auto", "client-state-dir": "/submitted/state"}
    bare = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config=submitted)
    assert resolve_config(bare, None).data_dir == ""  # the node's $FEDLOWRANK_DATA, not the submitter's path
    own = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "data-dir": str(tmp_path), "state-dir": str(tmp_path / "state")},
        state=RecordDict(),
        run_config=submitted,
    )
    config = resolve_config(own, None)
    assert config.data_dir == str(tmp_path)
    assert Path(state_store(config, own, in_process=False).root) == tmp_path / "state"
    disk = {**submitted, "client-state": "disk"}
    with pytest.raises(Exception, match="state-dir"):
        state_store(resolve_config(bare, None).__class__.from_flat(disk), bare, in_process=False)
