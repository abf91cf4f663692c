"""The cheapest student: TF-IDF features and a logistic regression (or small MLP) fitted on teacher labels.

    alambic train-classifier configs/generate_classifier.yaml

Trains on the teacher's labels (e.g. `train.jsonl` of a label run), scores on
a test split with gold labels, and reports the student's accuracy next to the
teacher's on the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from alambic.config import Strict
from alambic.errors import ConfigError, DataError
from alambic.generate.inputs import read_table, require_columns
from alambic.generate.outputs import write_json, write_table


class ClassifierConfig(Strict):
    train: str = Field(description="records with the text and the teacher's label")
    test: str = Field(description="records with the text, the gold label and optionally the teacher's label")
    text_column: str = "text"
    label_column: str = Field("label", description="the teacher's label, in train (and test, for its accuracy)")
    gold_column: str = Field("gold", description="the true label, in test")
    model: Literal["logistic_regression", "mlp"] = "logistic_regression"
    ngram_max: int = Field(2, ge=1, le=5, description="word n-grams 1..ngram_max")
    max_features: int | None = Field(50000, ge=1)
    regularization_c: float = Field(1.0, gt=0.0, description="inverse regularization strength (logistic regression)")
    hidden_sizes: list[int] = Field(default_factory=lambda: [64], description="MLP hidden layers")
    max_iter: int = Field(300, ge=1)
    seed: int = 0
    output_dir: str = "runs/classifier"


def _labelled(rows: list[dict], text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    pairs = [(str(r[text_column]), str(r[label_column])) for r in rows if r.get(label_column) not in (None, "")]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _accuracy(predicted: list, truth: list) -> float | None:
    if not truth:
        return None
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)


def _build_model(config: ClassifierConfig):
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
    except ImportError:
        raise ConfigError("train-classifier needs scikit-learn", "pip install 'alambic[classic]'") from None
    features = TfidfVectorizer(ngram_range=(1, config.ngram_max), max_features=config.max_features,
                               sublinear_tf=True)
    if config.model == "mlp":
        head = MLPClassifier(hidden_layer_sizes=tuple(config.hidden_sizes), max_iter=config.max_iter,
                             random_state=config.seed, early_stopping=False)
    else:
        head = LogisticRegression(C=config.regularization_c, max_iter=config.max_iter, random_state=config.seed)
    return make_pipeline(features, head)


def train_classifier(config: ClassifierConfig) -> dict:
    from alambic.output_paths import check_output_folder

    check_output_folder(config.output_dir, "output_dir")
    train_rows, test_rows = read_table(config.train), read_table(config.test)
    require_columns(train_rows, [config.text_column, config.label_column], f"train file {config.train!r}",
                    "text_column / label_column")
    require_columns(test_rows, [config.text_column, config.gold_column], f"test file {config.test!r}",
                    "text_column / gold_column")
    texts, teacher_labels = _labelled(train_rows, config.text_column, config.label_column)
    if len(set(teacher_labels)) < 2:
        raise DataError(f"train file {config.train!r} holds {len(set(teacher_labels))} distinct teacher label(s)",
                        "a classifier needs at least two classes; generate labels for more inputs")
    model = _build_model(config)
    model.fit(texts, teacher_labels)

    test_texts = [str(r[config.text_column]) for r in test_rows]
    gold = [str(r[config.gold_column]) for r in test_rows]
    predicted = [str(p) for p in model.predict(test_texts)]
    teacher_on_test = [r.get(config.label_column) for r in test_rows]
    answered = [(str(t), g) for t, g in zip(teacher_on_test, gold) if t not in (None, "")]
    report = {
        "model": config.model, "train_records": len(texts), "test_records": len(test_rows),
        "labels": sorted(set(teacher_labels)),
        "student": {"accuracy": _accuracy(predicted, gold)},
        "teacher": {
            "accuracy_where_labelled": _accuracy([t for t, _ in answered], [g for _, g in answered]),
            "accuracy_missing_as_wrong": (sum(t == g for t, g in answered) / len(gold)) if gold else None,
            "coverage": len(answered) / len(gold) if gold else None,
        },
        "student_teacher_agreement": _accuracy(
            [p for p, t in zip(predicted, teacher_on_test) if t not in (None, "")], [t for t, _ in answered]),
    }
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    rows = [{"text": t, "gold": g, "student": p, "teacher": tl} for t, g, p, tl in
            zip(test_texts, gold, predicted, teacher_on_test)]
    report["files"] = {"predictions": str(write_table(output / "predictions", rows, "jsonl")),
                       "report": str(output / "report.json")}
    write_json(output / "report.json", report)
    return report
