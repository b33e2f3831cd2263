"""Sequence tasks: each loader on a small file written here in the real format, the clean
protocol's splits and normaliser, and one-line errors that name the file."""
import math

import pytest
import torch

from harness.api import RunContext, UserError
from tasks.chars import CharParams, CharPrediction, vocabulary


# --------------------------------------------------------------------------------------------
# chars
# --------------------------------------------------------------------------------------------

def _text(tmp_path, body="the cat sat on the mat. " * 40 + "zebra QX"):
    path = tmp_path / "book.txt"
    path.write_text(body, encoding="utf-8")
    return path, body


def test_chars_loader_shapes_and_targets(tmp_path):
    path, body = _text(tmp_path)
    task = CharPrediction()
    params = CharParams(corpus="file", path=str(path), seq_len=8)
    data = task.load(params, RunContext(validation=0.1))
    vocab = vocabulary(body)
    v = len(vocab)
    assert task.presets(params)["rnn"].input_shape == (8, v)
    assert data.x_train.shape[1:] == (8, v) and data.y_train.shape[1:] == (8,)
    assert data.y_train.dtype == torch.int64 and data.x_train.dtype == torch.float32
    assert torch.equal(data.x_train.sum(-1), torch.ones(data.x_train.shape[:2]))
    # y is x shifted by one character
    assert torch.equal(data.x_train.argmax(-1)[:, 1:], data.y_train[:, :-1])
    # chronological: test windows are the last 20% of the text; unseen chars → unknown symbol
    n_chars = len(body)
    assert data.notes["windows"]["test"] == (n_chars - round(0.8 * n_chars) - 1) // 8
    assert "Q" not in vocab and data.y_test.max().item() == v - 1
    assert vocab[0] == " "   # index 0 = most frequent training character (the baseline)


def test_chars_metrics():
    task = CharPrediction()
    target = torch.tensor([[0, 1, 2, 0]])
    out = torch.full((1, 4, 3), -10.0)
    out[0, torch.arange(4), torch.tensor([0, 1, 1, 0])] = 10.0
    m = task.evaluate(out, target)
    assert m["accuracy"] == pytest.approx(75.0) and m["baseline_accuracy"] == pytest.approx(50.0)
    uniform = task.evaluate(torch.zeros(1, 4, 4), target)
    assert uniform["bpc"] == pytest.approx(2.0)


def test_chars_paper_protocol_uses_windows_of_t_plus_one(tmp_path):
    path, _ = _text(tmp_path)
    params = CharParams(corpus="file", path=str(path), seq_len=8)
    data = CharPrediction().load(params, RunContext(protocol="paper"))
    assert data.notes["stride"] == 9 and len(data.y_val) > 0


def test_chars_missing_and_malformed_files_are_one_line_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match="nope.txt") as err:
        CharPrediction().load(CharParams(corpus="file", path=str(missing)), RunContext())
    assert "\n" not in str(err.value)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 " * 100)
    with pytest.raises(UserError, match="latin1.txt") as err:
        CharPrediction().load(CharParams(corpus="file", path=str(bad)), RunContext())
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="path"):
        CharPrediction().presets(CharParams(corpus="harry_potter"))
