"""`alambic init-student` for BERT classifiers: head and pooler kept, width pruning, vocabulary trimming, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import invoke, write_config

TEXT = ("the market rallied as shares of the bank rose while the minister spoke about the election and the "
        "football team won the cup final after a late goal; the new phone ships with a faster chip and software")


def _wordpiece_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("enc")
    words = TEXT.replace(";", "").split()
    corpus = [" ".join(words[i : i + 9]) for i in range(0, len(words) - 9)] * 3
    corpus += ["quantum entanglement zebra xylophone yacht", "kangaroo volcano jungle rhythm"]  # words the domain lacks
    tokenizer = _wordpiece_tokenizer(corpus)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=tokenizer.pad_token_id)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # a pooler and head that are not the fresh-init defaults, so keeping them matters
        model.bert.pooler.dense.weight.normal_(0, 0.5)
        model.classifier.weight.normal_(0, 1.0)
    model.save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    domain = folder / "domain.jsonl"
    domain.write_text("".join(json.dumps({"text": " ".join(words[i : i + 12])}) + "\n" for i in range(0, len(words) - 12, 3)))
    return {"folder": folder, "teacher": folder / "teacher", "domain": domain, "model": model, "tokenizer": tokenizer}


def _config(bert, out, **extra):
    mapping = {"task": "sequence_classification", "teacher": {"model": str(bert["teacher"])},
               "output_dir": str(out), "method": "select", "layers": "all", "device": "cpu", "progress": False,
               "data": {"calibration": str(bert["domain"]), "max_length": 32, "batch_size": 4}}
    mapping.update(extra)
    return mapping


def _logits(folder, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits, model, tokenizer


def _domain_texts(bert):
    return [json.loads(line)["text"] for line in bert["domain"].read_text().splitlines()]


def test_keeping_every_layer_keeps_head_and_pooler_and_the_teachers_logits(bert, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", _config(bert, tmp_path / "student"))
    code, out, err = invoke(capsys, "init-student", config)
    assert code == 0, err
    texts = _domain_texts(bert)[:4]
    student, model, _ = _logits(tmp_path / "student", texts)
    teacher, _, _ = _logits(bert["teacher"], texts)
    assert type(model).__name__ == "BertForSequenceClassification" and model.bert.pooler is not None
    assert torch.allclose(student, teacher, atol=1e-5)
    report = json.loads((tmp_path / "student" / "init_report.json").read_text())
    assert report["student"]["agreement"] == 1.0 and report["student"]["kl"] < 1e-8


def test_trimmed_vocabulary_encodes_domain_text_to_the_same_tokens(bert, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", _config(bert, tmp_path / "trim", vocab={"keep_ascii_characters": False}))
    code, out, err = invoke(capsys, "init-student", config)
    assert code == 0, err
    texts = _domain_texts(bert)
    student, model, trimmed = _logits(tmp_path / "trim", texts)
    teacher, _, original = _logits(bert["teacher"], texts)
    assert len(trimmed) < len(original)  # the words the domain lacks are gone
    assert model.bert.embeddings.word_embeddings.weight.shape[0] == len(trimmed)
    for text in texts:
        assert trimmed.tokenize(text) == original.tokenize(text)
        assert trimmed.convert_ids_to_tokens(trimmed(text)["input_ids"]) == original.convert_ids_to_tokens(original(text)["input_ids"])
    assert torch.allclose(student, teacher, atol=1e-5)  # same tokens, same embedding rows, same logits
    assert trimmed.pad_token_id == model.config.pad_token_id
    # A live teacher reads a trimmed student's batches through vocab_map.json: its own ids, its own logits.
    from alambic.teachers.base import SignalRequest
    from alambic.teachers.live import LiveTeacher
    from alambic.teachers.vocab_map import teacher_for_student

    live = teacher_for_student(LiveTeacher(bert["model"]), original, trimmed, str(tmp_path / "trim"))
    batch = trimmed(texts, padding=True, return_tensors="pt")
    signal = live({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, SignalRequest())
    assert torch.allclose(signal.logits, teacher, atol=1e-5)
    with pytest.raises(Exception, match="vocab_map.json"):
        teacher_for_student(LiveTeacher(bert["model"]), original, trimmed, str(tmp_path))


def test_width_pruning_keeps_a_working_classifier_with_fewer_parameters(bert, tmp_path, capsys):
    from alambic.models.encoder_width import encoder_importance, plan_encoder_width, prune_encoder_width

    # Keeping every unit is the identity (slicing with all indices).
    batches = [{k: v for k, v in bert["tokenizer"](_domain_texts(bert)[:4], padding=True, return_tensors="pt").items()
                if k in ("input_ids", "attention_mask")}]
    importance = encoder_importance(bert["model"], batches)
    same = prune_encoder_width(bert["model"], plan_encoder_width(bert["model"], importance, None, None, None))
    with torch.no_grad():
        assert torch.allclose(same(**batches[0]).logits, bert["model"](**batches[0]).logits, atol=1e-5)
    config = write_config(tmp_path / "c.yaml", _config(bert, tmp_path / "narrow", method="prune", layers=[0, 2],
                                                       width={"hidden_keep": 16, "mlp_keep": 0.5}, vocab={}))
    code, out, err = invoke(capsys, "init-student", config)
    assert code == 0, err
    _, model, _ = _logits(tmp_path / "narrow", _domain_texts(bert)[:2])
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 16, 2, 32)
    assert model.classifier.weight.shape == (3, 16) and model.bert.pooler.dense.weight.shape == (16, 16)
    report = json.loads((tmp_path / "narrow" / "init_report.json").read_text())
    assert report["student"]["parameter_ratio"] < 0.5


def test_inconsistent_bert_width_is_refused(bert, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", _config(bert, tmp_path / "bad", method="prune",
                                                       width={"hidden_keep": 16, "heads_keep": 3}))
    code, _, err = invoke(capsys, "init-student", config)
    assert code == 2 and "must match" in err and not (tmp_path / "bad").exists()


def test_unsupported_architectures_exit_2_and_write_nothing(bert, tmp_path, capsys, tiny_micro):
    # A BERT classifier under the default task (causal_lm) is refused, not loaded as an LM without its head.
    config = write_config(tmp_path / "a.yaml", {**_config(bert, tmp_path / "a"), "task": "causal_lm"})
    code, _, err = invoke(capsys, "init-student", config)
    assert code == 2 and "not a causal LM" in err and "task: sequence_classification" in err
    # A decoder given as a classifier teacher.
    config = write_config(tmp_path / "b.yaml", {**_config(bert, tmp_path / "b"), "teacher": {"model": str(tiny_micro["teacher"])}})
    code, _, err = invoke(capsys, "init-student", config)
    assert code == 2 and "BERT-family" in err
    # Vocabulary trimming of a non-WordPiece (BPE) tokenizer.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_micro["teacher"]).save_pretrained(tmp_path / "bpe_bert")
    bert["model"].config.save_pretrained(tmp_path / "bpe_bert")
    bert["model"].save_pretrained(tmp_path / "bpe_bert")
    config = write_config(tmp_path / "c.yaml", {**_config(bert, tmp_path / "c", vocab={}),
                                                "teacher": {"model": str(tmp_path / "bpe_bert")}})
    code, _, err = invoke(capsys, "init-student", config)
    assert code == 2 and "WordPiece" in err
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


@pytest.fixture(scope="module")
def tiny_micro(tmp_path_factory):
    from tests.recipes.modes_micro import build_micro

    return build_micro(tmp_path_factory.mktemp("micro"))
