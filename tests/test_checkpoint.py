"""Checkpoint formats: transformers directories, the authors' .pth layouts, strict loading."""

import json
import re

import pytest
import torch
from lxmert_testing import SMALL, hf_config, make_batch, max_abs_diff

import lxmert_fast
from lxmert_fast import (
    CheckpointError,
    LxmertConfig,
    LxmertForPreTraining,
    LxmertForQuestionAnswering,
    LxmertModel,
)
from lxmert_fast.checkpoint import infer_config, load_state_dict_strict, to_hf_names

transformers = pytest.importorskip("transformers")


def outputs(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs, output_hidden_states=True, return_dict=False)


@pytest.fixture
def pretraining():
    return LxmertForPreTraining(LxmertConfig(**SMALL)).eval()


@pytest.fixture
def inputs():
    return make_batch(LxmertConfig(**SMALL), 3, 9, 12, True, True)


def test_save_pretrained_loads_in_transformers_with_identical_outputs(tmp_path, pretraining, inputs):
    pretraining.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LxmertForPreTraining"]
    hf = transformers.LxmertForPreTraining.from_pretrained(tmp_path).eval()
    assert max_abs_diff(outputs(hf, inputs), outputs(pretraining, inputs)) == 0.0


def test_transformers_directory_round_trips(tmp_path, inputs):
    hf = transformers.LxmertForPreTraining(hf_config(**SMALL)).eval()
    hf.save_pretrained(tmp_path / "st")
    hf.save_pretrained(tmp_path / "bin", safe_serialization=False)
    for sub in ("st", "bin"):
        ours = LxmertForPreTraining.from_pretrained(tmp_path / sub)
        assert not ours.training
        assert max_abs_diff(outputs(hf, inputs), outputs(ours, inputs)) == 0.0
        assert ours.cls.predictions.decoder.weight is ours.lxmert.embeddings.word_embeddings.weight
    again = tmp_path / "again"
    ours.save_pretrained(again)
    assert (
        max_abs_diff(outputs(LxmertForPreTraining.from_pretrained(again), inputs), outputs(hf, inputs)) == 0.0
    )


def test_sharded_safetensors_index(tmp_path, pretraining, inputs):
    from safetensors.torch import save_file

    state = {
        k: v.contiguous()
        for k, v in pretraining.state_dict().items()
        if k != "cls.predictions.decoder.weight"
    }
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, tmp_path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_keys, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pretraining.config.save_pretrained(tmp_path)
    loaded = LxmertForPreTraining.from_pretrained(tmp_path)
    assert max_abs_diff(outputs(loaded, inputs), outputs(pretraining, inputs)) == 0.0


def test_sharded_bin_index(tmp_path, pretraining, inputs):
    # The layout of transformers 4's save_pretrained(safe_serialization=False, max_shard_size=...).
    state = {k: v.clone() for k, v in pretraining.state_dict().items()}
    keys = sorted(state)
    weight_map = {}
    for i, shard_keys in enumerate((keys[::2], keys[1::2])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: state[k] for k in shard_keys}, tmp_path / name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pretraining.config.save_pretrained(tmp_path)
    loaded = LxmertForPreTraining.from_pretrained(tmp_path)
    assert max_abs_diff(outputs(loaded, inputs), outputs(pretraining, inputs)) == 0.0


def test_deepspeed_checkpoint_points_to_the_export(tmp_path, pretraining):
    # The layout DeepSpeed's save_checkpoint writes: checkpoints/{latest,zero_to_fp32.py,stepN/...}.
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step4").mkdir(parents=True)
    (ckpt / "latest").write_text("step4")
    states = {"module": pretraining.state_dict(), "buffer_names": [], "ds_version": "0.19.8", "ds_config": {}}
    model_file = ckpt / "step4" / "mp_rank_00_model_states.pt"
    torch.save(states, model_file)
    renamed = tmp_path / "model_states.pt"
    torch.save(states, renamed)
    for path in (model_file, renamed, ckpt / "step4", ckpt):
        with pytest.raises(CheckpointError, match=r"a DeepSpeed checkpoint .*export/ .*zero_to_fp32\.py"):
            LxmertForPreTraining.from_pretrained(path)


def authors_pretrain_dict(model):
    """Epoch20_LXRT.pth layout: DataParallel's module. prefix and bert. for lxmert."""
    out = {}
    for k, v in model.state_dict().items():
        k = "bert." + k[len("lxmert.") :] if k.startswith("lxmert.") else k
        out["module." + k] = v.clone()
    return out


def test_authors_pretraining_pth_loads_strictly(tmp_path, pretraining, inputs):
    path = tmp_path / "Epoch20_LXRT.pth"
    torch.save(authors_pretrain_dict(pretraining), path)
    assert any(k.startswith("module.bert.encoder.x_layers.0.visual_attention") for k in torch.load(path))
    loaded = LxmertForPreTraining.from_pretrained(path, config=pretraining.config)
    assert max_abs_diff(outputs(loaded, inputs), outputs(pretraining, inputs)) == 0.0
    backbone = LxmertModel.from_pretrained(path, config=pretraining.config)
    assert max_abs_diff(outputs(backbone, inputs), outputs(pretraining.lxmert, inputs)) == 0.0


def test_authors_pth_without_config_infers_the_architecture(tmp_path):
    # LXMERT's heads have 64 features; with that the whole config is read off the weights.
    model = LxmertForPreTraining(
        LxmertConfig(**{**SMALL, "hidden_size": 128, "num_attention_heads": 2})
    ).eval()
    torch.save(authors_pretrain_dict(model), tmp_path / "model_LXRT.pth")
    loaded = LxmertForPreTraining.from_pretrained(tmp_path / "model_LXRT.pth")
    inputs = make_batch(model.config, 2, 6, 7, True, False)
    assert max_abs_diff(outputs(loaded, inputs), outputs(model, inputs)) == 0.0


def test_infer_config_reads_the_architecture(pretraining):
    config = infer_config(to_hf_names(authors_pretrain_dict(pretraining)), num_attention_heads=3)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "l_layers", "x_layers", "r_layers"):
        assert getattr(config, name) == getattr(pretraining.config, name), name
    for name in ("visual_feat_dim", "num_qa_labels", "num_object_labels", "num_attr_labels"):
        assert getattr(config, name) == getattr(pretraining.config, name), name
    assert (
        infer_config(to_hf_names(authors_pretrain_dict(pretraining))).num_attention_heads == 1
    )  # 48 // 64 -> 1


def test_authors_finetuned_vqa_pth_loads(tmp_path, inputs):
    qa = LxmertForQuestionAnswering(LxmertConfig(**SMALL)).eval()
    state = {}
    for k, v in qa.state_dict().items():
        if k.startswith("lxmert."):
            state["lxrt_encoder.model.bert." + k[len("lxmert.") :]] = v
        else:
            state[k[len("answer_head.") :]] = v
    assert "logit_fc.3.weight" in state
    torch.save(state, tmp_path / "BEST.pth")
    loaded = LxmertForQuestionAnswering.from_pretrained(tmp_path / "BEST.pth", config=qa.config)
    assert max_abs_diff(outputs(loaded, inputs), outputs(qa, inputs)) == 0.0
    # DataParallel inside the task model: lxrt_encoder.model.module.bert.
    parallel = {k.replace("lxrt_encoder.model.", "lxrt_encoder.model.module."): v for k, v in state.items()}
    torch.save(parallel, tmp_path / "BEST_dp.pth")
    loaded = LxmertForQuestionAnswering.from_pretrained(tmp_path / "BEST_dp.pth", config=qa.config)
    assert max_abs_diff(outputs(loaded, inputs), outputs(qa, inputs)) == 0.0


def test_strict_loading_lists_every_bad_key(pretraining):
    state = {k: v.clone() for k, v in pretraining.state_dict().items()}
    del state["lxmert.pooler.dense.bias"]
    del state["cls.seq_relationship.weight"]
    state["lxmert.encoder.extra.weight"] = torch.zeros(1)
    state["answer_head.logit_fc.3.weight"] = torch.zeros(5, SMALL["hidden_size"] * 2)
    target = LxmertForPreTraining(LxmertConfig(**SMALL))
    before = target.lxmert.pooler.dense.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(target, state)
    message = str(info.value)
    for key in ("lxmert.pooler.dense.bias", "cls.seq_relationship.weight", "lxmert.encoder.extra.weight"):
        assert key in message
    assert "answer_head.logit_fc.3.weight: checkpoint (5, 96) vs model (13, 96)" in message
    assert "2 missing" in message and "1 unexpected" in message and "1 mis-shaped" in message
    assert torch.equal(target.lxmert.pooler.dense.weight, before), "nothing may be loaded on error"


def test_backbone_only_starts_fresh_heads(tmp_path, pretraining, inputs):
    path = tmp_path / "Epoch20_LXRT.pth"
    torch.save(authors_pretrain_dict(pretraining), path)
    config = LxmertConfig(**{**SMALL, "num_qa_labels": 5})
    with pytest.raises(CheckpointError, match="mis-shaped"):
        LxmertForQuestionAnswering.from_pretrained(path, config=config)
    qa = LxmertForQuestionAnswering.from_pretrained(path, config=config, backbone_only=True)
    assert qa.answer_head.logit_fc[3].weight.shape == (5, 96)
    assert max_abs_diff(outputs(qa.lxmert, inputs), outputs(pretraining.lxmert, inputs)) == 0.0


def test_untied_decoder_that_differs_is_an_error(pretraining):
    state = {k: v.clone() for k, v in pretraining.state_dict().items()}
    state["cls.predictions.decoder.weight"] += 1
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        load_state_dict_strict(LxmertForPreTraining(LxmertConfig(**SMALL)), state)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights found"):
        LxmertModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        LxmertModel.from_pretrained(tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="state dict"):
        LxmertModel.from_pretrained(tmp_path / "bad.pth")


def test_config_round_trips_with_transformers(tmp_path):
    hf = hf_config(**SMALL, task_qa=False)
    hf.save_pretrained(tmp_path)
    ours = LxmertConfig.from_pretrained(tmp_path)
    assert ours.task_qa is False and ours.hidden_size == 48 and ours.num_attention_heads == 3
    assert "transformers_version" in ours.extra
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    back = transformers.LxmertConfig.from_pretrained(out)
    for name in LxmertConfig.field_names():
        # No answer names: ours None, transformers its placeholders LABEL_0, LABEL_1.
        if hasattr(back, name) and not (name in ("id2label", "label2id") and getattr(ours, name) is None):
            assert getattr(back, name) == getattr(ours, name), name
    assert lxmert_fast.LxmertConfig.from_hf(hf).to_dict()["num_qa_labels"] == hf.num_qa_labels


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="hidden_size"):
        LxmertConfig(hidden_size=50, num_attention_heads=3)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="model_type"):
        LxmertConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid JSON"):
        LxmertConfig.from_pretrained(tmp_path)


def _damage(path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("these are not weights\n")


@pytest.mark.parametrize(
    ("weights", "how", "message"),
    [
        ("model.safetensors", "truncated", "not a readable safetensors file"),
        ("pytorch_model.bin", "truncated", "not a readable PyTorch checkpoint"),
        ("Epoch20_LXRT.pth", "text", "not a readable PyTorch checkpoint"),
    ],
    ids=["truncated_safetensors", "truncated_bin", "text_pth"],
)
def test_unreadable_weights_name_the_file(tmp_path, pretraining, weights, how, message):
    if weights == "model.safetensors":
        pretraining.save_pretrained(tmp_path)
    else:
        torch.save(pretraining.state_dict(), tmp_path / weights)
    _damage(tmp_path / weights, how)
    target = tmp_path if weights != "Epoch20_LXRT.pth" else tmp_path / weights
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / weights}: {message}")):
        LxmertForPreTraining.from_pretrained(target)


def test_bad_config_and_shard_index_name_the_file(tmp_path, pretraining):
    pretraining.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": -5}))
    with pytest.raises(ValueError, match=r"config\.json: vocab_size: expected a positive integer, got -5"):
        LxmertForPreTraining.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config)[:40])
    with pytest.raises(ValueError, match=r"config\.json: not a valid JSON config \(.*line 1 column"):
        LxmertForPreTraining.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text("")
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors\.index\.json: not a valid JSON shard index"
    ):
        LxmertForPreTraining.from_pretrained(tmp_path)
