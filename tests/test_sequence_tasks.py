"""Sequence tasks: each loader on a small file written here in the real format, the clean
protocol's splits and normaliser, and one-line errors that name the file."""

import pytest
import torch

from harness.api import RunContext, Split, SplitData, UserError
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
    assert task.presets(params, RunContext())["rnn"].input_shape == (8, v)
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
    split = SplitData(Split.TEST, out, target)
    m = task.evaluate(out, target, split)
    assert m["accuracy"] == pytest.approx(75.0) and m["baseline_accuracy"] == pytest.approx(50.0)
    uniform = task.evaluate(torch.zeros(1, 4, 4), target, split)
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
        CharPrediction().presets(CharParams(corpus="file"), RunContext())
    # harry_potter is a user-supplied dataset: the harness skips its runs when it is missing
    assert CharPrediction().datasets(CharParams(corpus="harry_potter")) == ["harry_potter"]
    with pytest.raises(UserError, match="harry_potter.txt"):
        CharPrediction().load(CharParams(corpus="harry_potter"), RunContext(data_dir=str(tmp_path)))


# --------------------------------------------------------------------------------------------
# forecast
# --------------------------------------------------------------------------------------------

from tasks._series import SERIES, taylor_csv, taylor_values  # noqa: E402
from tasks.forecast import Forecast, ForecastParams  # noqa: E402


def _sensor_csv(path, readings=60):
    lines = ["reading,mote_id,indoor,humidity,temperature,label"]
    for mote in (1, 2, 3, 4):
        for r in range(1, readings + 1):
            lines.append(f"{r},{mote},{int(mote > 2)},{40 + mote + 0.1 * r:.2f},"
                         f"{20 + mote + 0.01 * r:.2f},0")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sensor_network_loader_pivots_to_eight_channels(tmp_path):
    path = _sensor_csv(tmp_path / "data.csv")
    task = Forecast()
    params = ForecastParams(dataset="sensor_network", path=str(path), seq_len=5)
    data = task.load(params, RunContext(validation=0.2))
    assert task.presets(params, RunContext())["rnn"].input_shape == (5, 8)
    assert data.x_train.shape[1:] == (5, 8) and data.y_train.shape[1:] == (5, 8)
    # column order: mote 1 humidity, mote 1 temperature, mote 2 humidity, …
    raw = task.read(params, tmp_path)[1]
    assert raw.shape == (60, 8) and raw[0, 0] == pytest.approx(41.1) \
        and raw[0, 1] == pytest.approx(21.01) and raw[0, 2] == pytest.approx(42.1)
    # horizon 1: the target at step t is the input at step t+1
    assert torch.allclose(data.x_train[:, 1:], data.y_train[:, :-1])


def test_lstnet_text_loader_and_horizon(tmp_path):
    import numpy as np
    rows = np.arange(200 * 321, dtype=float).reshape(200, 321) % 97
    path = tmp_path / "electricity.txt"
    path.write_text("\n".join(",".join(f"{v:g}" for v in row) for row in rows) + "\n")
    params = ForecastParams(dataset="electricity", path=str(path), seq_len=8, horizon=3,
                            targets="0,320")
    data = Forecast().load(params, RunContext())
    assert data.x_train.shape[1:] == (8, 321) and data.y_train.shape[1:] == (8, 2)
    assert torch.allclose(data.x_train[:, 3:, [0, 320]], data.y_train[:, :-3])
    assert Forecast().presets(params, RunContext())["rnn"].output_size == 2
    assert SERIES["electricity"][1] == 321


def test_h5_loader_reads_pandas_frames_without_pickle(tmp_path):
    """METR-LA-style frames written by pandas itself (fixed and table format, a datetime index
    whose attributes pandas pickles), read with h5py: the values, in column order."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("tables")            # pandas needs PyTables to *write* the fixtures
    import numpy as np
    values = np.random.default_rng(0).normal(size=(120, 207))
    index = pd.date_range("2012-03-01", periods=120, freq="5min")
    frame = pd.DataFrame(values, columns=[f"{773869 + i}" for i in range(207)], index=index)
    for fmt in ("fixed", "table"):
        path = tmp_path / f"metr-la-{fmt}.h5"
        frame.to_hdf(path, key="df", format=fmt)
        data = Forecast().load(ForecastParams(dataset="metr_la", path=str(path), seq_len=6),
                               RunContext())
        assert data.x_train.shape[1:] == (6, 207) and data.y_test.shape[1:] == (6, 207)
        from tasks._series import read_h5
        assert np.array_equal(read_h5(path), values)
    mixed = pd.DataFrame({"b": np.arange(5.0), "a": np.arange(5), "c": np.arange(5.0) * 2})
    mixed.to_hdf(tmp_path / "mixed.h5", key="df")      # two blocks: float and int columns
    from tasks._series import read_h5
    assert np.array_equal(read_h5(tmp_path / "mixed.h5"), mixed.to_numpy(dtype=float))
    bad = tmp_path / "pems-bay.h5"
    bad.write_text("not hdf5")
    with pytest.raises(UserError, match="pems-bay.h5: not an HDF5 file") as err:
        Forecast().load(ForecastParams(dataset="pems_bay", path=str(bad)), RunContext())
    assert "\n" not in str(err.value)


class _Trap:
    """Unpickling one of these writes a file: the proof that something was unpickled."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickled_h5_is_refused_and_nothing_is_unpickled(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("tables")
    import warnings
    trap = tmp_path / "unpickled"
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [_Trap(str(trap))] * 3})
    path = tmp_path / "metr-la.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # pandas warns that it pickles the object column
        frame.to_hdf(path, key="df")
    assert not trap.exists()
    with pytest.raises(UserError, match="pickled Python objects") as err:
        Forecast().load(ForecastParams(dataset="metr_la", path=str(path)), RunContext())
    assert "\n" not in str(err.value) and not trap.exists()


def test_urls_only_from_the_hosts_a_dataset_declares(tmp_path):
    for url in ("https://evil.example.com/metr-la.h5", "http://zenodo.org/metr-la.h5",
                "ftp://zenodo.org/x.h5"):
        with pytest.raises(UserError, match="not a source this dataset may be fetched from"):
            Forecast().load(ForecastParams(dataset="metr_la", path=url),
                            RunContext(data_dir=str(tmp_path)))
    assert not (tmp_path / "_downloads").exists()
    with pytest.raises(UserError, match="not a source"):   # sensor_network names no host
        Forecast().load(ForecastParams(dataset="sensor_network", path="https://zenodo.org/x"),
                        RunContext(data_dir=str(tmp_path)))
    local = _sensor_csv(tmp_path / "data.csv")
    data = Forecast().load(ForecastParams(dataset="sensor_network", path=local.as_uri(),
                                          seq_len=5), RunContext(validation=0.2))
    assert data.x_train.shape[1:] == (5, 8)


def test_errors_never_quote_the_file(tmp_path):
    """A fetched file's first line (here: a secret) never reaches a message, so never the
    store."""
    secret = "TOKEN-1234-secret"
    for dataset, name, body in (("sensor_network", "data.csv", f"{secret},x\n1,2\n"),
                                ("uk_electricity", "taylor.csv", f"demand\n{secret}\n1\n"),
                                ("electricity", "electricity.txt", f"{secret}\n1,2\n")):
        path = tmp_path / name
        path.write_text(body)
        with pytest.raises(UserError) as err:
            Forecast().load(ForecastParams(dataset=dataset, path=str(path)), RunContext())
        assert secret not in str(err.value), str(err.value)


def test_clean_normaliser_never_sees_validation_or_test_rows(tmp_path):
    """Train rows ~ N(0, 1); validation and test rows are huge. A normaliser fitted on all rows
    would give training inputs far from mean 0 / std 1; fitted on train only, it does not."""
    import numpy as np
    values = np.random.default_rng(1).normal(size=400)
    values[300:] += 1000.0            # rows 300.. are validation (from 288) and test (from 320)
    path = tmp_path / "taylor.csv"
    path.write_text(taylor_csv(list(values)))
    data = Forecast().load(ForecastParams(dataset="uk_electricity", path=str(path), seq_len=4),
                           RunContext(validation=0.1))
    assert data.notes["normaliser_fitted_on"] == "training rows 0..287"
    train_rows = values[:288]
    x = data.x_train[:, 0, 0]        # stride 1: the first step of each window = train rows
    expected = (train_rows[: len(x)] - train_rows.mean()) / train_rows.std(ddof=1)
    assert torch.allclose(x.double(), torch.tensor(expected), atol=1e-5)
    assert data.x_train.abs().max() < 5 and data.x_test.min() > 100
    # no window reaches across a split: training targets are training rows
    assert data.y_train.abs().max() < 5


def test_forecast_metrics_and_persistence():
    task = Forecast()
    target = torch.tensor([[[0.0], [1.0], [3.0]]])
    m = task.evaluate(target.clone(), target, SplitData(Split.TEST, target, target))
    assert m["mse"] == 0.0 and m["persistence_mse"] == pytest.approx((1 + 4) / 2)


def test_paper_protocol(tmp_path):
    path = _sensor_csv(tmp_path / "data.csv", readings=100)
    params = ForecastParams(dataset="sensor_network", path=str(path), seq_len=8, targets="last")
    data = Forecast().load(params, RunContext(protocol="paper"))
    n = 100 - 8 + 1
    assert sum(data.notes["windows"].values()) == n and data.notes["windows"]["test"] == 19
    assert data.y_train.shape[1:] == (8, 1)
    assert (data.x_train[..., 7] == 0).all()          # the target column is not an input
    with pytest.raises(UserError, match="targets: last"):
        Forecast().load(ForecastParams(dataset="sensor_network", path=str(path)),
                        RunContext(protocol="paper"))


def test_taylor_array_read_without_importing(tmp_path):
    source = "import numpy as np\ndef load_taylor():\n    rslt = np.array([\n  1, 2,\n 3]).astype(float)\n"
    assert taylor_values(source) == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("dataset,name,body", [
    ("sensor_network", "data.csv", "reading,mote\n1,2\n"),
    ("uk_electricity", "taylor.csv", "demand\n1\nabc\n"),
    ("electricity", "electricity.txt", "1,2\n3,4\n"),
])
def test_forecast_malformed_and_missing_files_are_one_line_errors(tmp_path, dataset, name, body):
    path = tmp_path / name
    with pytest.raises(UserError, match=name) as err:
        Forecast().load(ForecastParams(dataset=dataset, path=str(path)), RunContext())
    assert "\n" not in str(err.value)
    path.write_text(body)
    with pytest.raises(UserError, match=name) as err:
        Forecast().load(ForecastParams(dataset=dataset, path=str(path)), RunContext())
    assert "\n" not in str(err.value)


def test_predicting_the_change_keeps_every_metric_comparable(tmp_path):
    """predict: change — the target is x_{t+h} − x_t, so output 0 is the persistence forecast
    and its MSE equals the value-mode persistence MSE on the same steps."""
    import numpy as np
    rows = np.cumsum(np.random.default_rng(0).normal(size=(300, 321)), axis=0)
    path = tmp_path / "electricity.txt"
    path.write_text("\n".join(",".join(f"{v:.6f}" for v in row) for row in rows) + "\n")
    common = dict(dataset="electricity", path=str(path), seq_len=8, horizon=2, targets="0,5")
    value = Forecast().load(ForecastParams(**common), RunContext())
    task = Forecast()
    change = task.load(ForecastParams(**common, predict="change"), RunContext())
    assert torch.allclose(change.y_test, value.y_test - value.x_test[..., [0, 5]], atol=1e-5)
    zero = task.evaluate(torch.zeros_like(change.y_test), change.y_test, change.test)
    assert zero["mse"] == pytest.approx(zero["persistence_mse"])
    assert zero["mse"] == pytest.approx(
        (value.y_test - value.x_test[..., [0, 5]]).pow(2).mean().item(), rel=1e-5)
    with pytest.raises(UserError, match="clean protocol"):
        Forecast().load(ForecastParams(**{**common, "targets": "last"}, predict="change"),
                        RunContext(protocol="paper"))


def test_change_inputs_are_step_differences_and_widen_the_preset_for_both(tmp_path):
    """inputs: change feeds z[t] − z[t−1] (0 at a window's first step); both puts the values
    first and the changes beside them; the targets do not depend on the inputs."""
    path = _sensor_csv(tmp_path / "data.csv", readings=80)
    common = dict(dataset="sensor_network", path=str(path), seq_len=6)
    value = Forecast().load(ForecastParams(**common), RunContext())
    change = Forecast().load(ForecastParams(**common, inputs="change"), RunContext())
    params = ForecastParams(**common, inputs="both")
    both = Forecast().load(params, RunContext())
    for split in ("train", "val", "test"):
        xv, xc, xb = (getattr(d, f"x_{split}") for d in (value, change, both))
        assert (xc[:, 0] == 0).all()
        assert torch.allclose(xc[:, 1:], xv[:, 1:] - xv[:, :-1], atol=1e-6)
        assert torch.equal(xb, torch.cat([xv, xc], dim=-1))
        assert torch.equal(getattr(value, f"y_{split}"), getattr(change, f"y_{split}"))
    assert Forecast().presets(params, RunContext())["rnn"].input_shape == (6, 16)
    assert both.info.input_shape == (6, 16)
    assert Forecast().presets(ForecastParams(**common, inputs="change"), RunContext())["rnn"].input_shape == (6, 8)
    with pytest.raises(UserError, match="clean protocol"):
        Forecast().load(ForecastParams(**common, targets="last", inputs="change"),
                        RunContext(protocol="paper"))


def test_value_mode_persistence_is_scored_on_every_position(tmp_path):
    """Clean protocol: persistence_mse is (y − value at t)² over every step of every window —
    the positions the model is scored on — so it equals the change mode's exact figure and
    differs from a within-window estimate that skips each window's first step."""
    import numpy as np
    rows = np.cumsum(np.random.default_rng(3).normal(size=(400, 321)) ** 3, axis=0)
    path = tmp_path / "electricity.txt"
    path.write_text("\n".join(",".join(f"{v:.6f}" for v in row) for row in rows) + "\n")
    common = dict(dataset="electricity", path=str(path), seq_len=5, horizon=2, targets="0,7")
    task = Forecast()
    value = task.load(ForecastParams(**common), RunContext())
    ctask = Forecast()
    change = ctask.load(ForecastParams(**common, predict="change"), RunContext())
    for split in ("val", "test"):
        y, yc = getattr(value, f"y_{split}"), getattr(change, f"y_{split}")
        exact = yc.pow(2).mean().item()
        assert task.evaluate(y, y, getattr(value, split))["persistence_mse"] == \
            pytest.approx(exact, rel=1e-5)
        assert ctask.evaluate(yc, yc, getattr(change, split))["persistence_mse"] == \
            pytest.approx(exact, rel=1e-5)
        skipping = (y[:, 2:] - y[:, :-2]).pow(2).mean().item()
        assert skipping != pytest.approx(exact, rel=1e-3)


def _labelled_sensor_csv(path, readings, anomalous):
    lines = ["reading,mote_id,indoor,humidity,temperature,label"]
    for mote in (1, 2, 3, 4):
        for r in range(1, readings + 1):
            bad = int(mote == 3 and r - 1 in anomalous)
            lines.append(f"{r},{mote},{int(mote > 2)},{40 + mote + 0.1 * r + 50 * bad:.2f},"
                         f"{20 + mote + 0.01 * r:.2f},{bad}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_drop_anomalies_leaves_out_training_windows_touching_labelled_rows(tmp_path):
    """Rows 20–22 (training) are labelled: with drop_anomalies no training window's inputs or
    targets reach them (the +50 jump is gone from x and y), every other training window stays,
    and validation and test are untouched."""
    path = _labelled_sensor_csv(tmp_path / "data.csv", readings=100, anomalous={20, 21, 22})
    common = dict(dataset="sensor_network", path=str(path), seq_len=4)
    kept = Forecast().load(ForecastParams(**common), RunContext(validation=0.1))
    dropped = Forecast().load(ForecastParams(**common, drop_anomalies=True),
                              RunContext(validation=0.1))
    # stride 1: starts s with rows s..s+4 (4 steps + 1 ahead) touching 20..22 are s = 16..22
    assert kept.notes["windows"]["train"] - dropped.notes["windows"]["train"] == 7
    assert kept.x_train[..., 4].max() - dropped.x_train[..., 4].max() > 3    # mote 3 humidity (z)
    assert dropped.y_train[..., 4].max() < kept.y_train[..., 4].max() - 3
    for split in ("val", "test"):
        assert torch.equal(getattr(kept, f"y_{split}"), getattr(dropped, f"y_{split}"))
    assert dropped.notes["dropped"].endswith("3 labelled rows")
    taylor = tmp_path / "taylor.csv"
    taylor.write_text(taylor_csv([float(i % 7) for i in range(200)]))
    with pytest.raises(UserError, match="no anomaly labels"):
        Forecast().load(ForecastParams(dataset="uk_electricity", path=str(taylor),
                                       drop_anomalies=True), RunContext())
    with pytest.raises(UserError, match="clean protocol"):
        Forecast().load(ForecastParams(**common, targets="last", drop_anomalies=True),
                        RunContext(protocol="paper"))


def test_url_downloads_are_cached_per_url_and_gunzipped(tmp_path):
    """A series given by URL is fetched once (the second load reads the cache), two URLs with
    the same file name do not collide, and a .gz is stored decompressed."""
    import gzip
    import http.server
    import threading
    from functools import partial

    from harness.data import download

    served = tmp_path / "served"
    for folder, value in (("a", "1,2\n3,4\n"), ("b", "5,6\n7,8\n")):
        (served / folder).mkdir(parents=True)
        (served / folder / "series.txt").write_text(value)
        (served / folder / "series.txt.gz").write_bytes(gzip.compress(value.encode()))
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        downloads = tmp_path / "data" / "_downloads"
        def _download(url, folder):     # the test server: plain http on the loopback
            return download(url, folder, hosts=("127.0.0.1",), schemes=("http",))
        first = _download(f"{base}/a/series.txt", downloads)
        again = _download(f"{base}/a/series.txt", downloads)
        other = _download(f"{base}/b/series.txt", downloads)
        zipped = _download(f"{base}/b/series.txt.gz", downloads)
        zipped_again = _download(f"{base}/b/series.txt.gz", downloads)
        assert first == again and first.read_text() == "1,2\n3,4\n"
        assert other != first and other.read_text() == "5,6\n7,8\n"
        assert zipped == zipped_again and zipped.name == "series.txt"
        assert zipped.read_text() == "5,6\n7,8\n"
        assert len(requests) == 3                      # one request per distinct URL
        assert not list(downloads.rglob("*.part"))
        with pytest.raises(UserError, match="cannot download"):
            _download(f"{base}/missing.txt", downloads)
    finally:
        server.shutdown()
