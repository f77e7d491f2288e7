"""QM9 for multi-task regression: a PyG-layout dump, the MTL papers' split and targets.

The protocol (Nash-MTL / FAMO, docs/benchmarks.md): 11 of PyG's 19 targets, indices
[0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11] (mu, alpha, homo, lumo, r2, zpve, the atomization
energies U0, U, H, G, and cv; the gap, 4, is left out); one seeded shuffle, then the first
10,000 molecules are the test set, the next 10,000 the validation set and the rest (110,831) the
training set; targets standardised with the training mean and std; MAE reported in original
units, the seven energies (homo, lumo, zpve, U0, U, H, G; eV in PyG) times 1000, in meV. The
shuffle is ``torch.randperm`` seeded with ``seed``: the published runs' permutation cannot be
rebuilt (PyG's ``shuffle()`` drew from the global generator after the model's initialisation).

The dump (``load_qm9_dump``): a Hugging Face dataset with PyG's ``Data`` fields as columns, one
row per molecule, as ``lisn519010/QM9`` (split ``full``, 130,831 rows) stores them:

    z           list[int]          (N,)     atomic numbers (1 H, 6 C, 7 N, 8 O, 9 F)
    pos         list[list[float]]  (N, 3)   positions, Angstrom
    y           list[list[float]]  (1, 19)  PyG's 19 targets in PyG's units (a flat (19,) too)
    x           list[list[float]]  (N, 11)  PyG's atom features (only with use_pyg_features)
    edge_index  list[list[int]]    (2, E)   bonds, both directions, 0-based per molecule (idem)
    edge_attr   list[list[float]]  (E, 4)   bond type one-hot: single, double, triple, aromatic

Other columns (``name``, ``idx``) are ignored. Given as a hub id, a local directory (parquet /
Arrow files, e.g. ``data/full-00000-of-00001.parquet``, or a ``save_to_disk`` directory) or a
single parquet file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..metrics import RegressionErrors, delta_m


@dataclass(frozen=True)
class QM9Target:
    """One target: task name, column in PyG's ``y``, reported unit, eV energy (reported x1000)."""

    name: str
    index: int
    unit: str
    energy: bool = False

    @property
    def report_scale(self) -> float:
        """Factor from PyG's unit to the reported one (eV -> meV for energies)."""
        return 1000.0 if self.energy else 1.0


# The 11 targets of the MTL protocol, in its order (PyG index 12..15: atomization energies).
QM9_TARGETS: tuple[QM9Target, ...] = (
    QM9Target("mu", 0, "D"),
    QM9Target("alpha", 1, "a0^3"),
    QM9Target("homo", 2, "meV", energy=True),
    QM9Target("lumo", 3, "meV", energy=True),
    QM9Target("r2", 5, "a0^2"),
    QM9Target("zpve", 6, "meV", energy=True),
    QM9Target("u0", 12, "meV", energy=True),
    QM9Target("u", 13, "meV", energy=True),
    QM9Target("h", 14, "meV", energy=True),
    QM9Target("g", 15, "meV", energy=True),
    QM9Target("cv", 11, "cal/(mol K)"),
)
QM9_NUM_PYG_TARGETS = 19
# Single-task MPNN baselines, MAE in the reported units (Nash-MTL; docs/benchmarks.md).
_BASELINE = (0.0671, 0.1814, 60.576, 53.915, 0.5027, 4.539, 58.838, 64.244, 63.852, 66.223, 0.07212)
QM9_BASELINE_MAE: Mapping[str, float] = MappingProxyType(
    {f"{t.name}/mae": v for t, v in zip(QM9_TARGETS, _BASELINE, strict=True)}
)
PYG_ATOM_FEATURES = 11
PYG_BOND_FEATURES = 4
QM9_HUB_ID = "lisn519010/QM9"
EXPECTED_LAYOUT = (
    "a Hugging Face dataset in PyG's QM9 layout, one row per molecule with columns z (atomic "
    "numbers), pos ((N, 3) positions), y ((1, 19) PyG targets) and, for the PyG features, "
    "x ((N, 11)), edge_index ((2, E)) and edge_attr ((E, 4)): a hub id, a directory of parquet "
    "/ Arrow files (e.g. data/full-00000-of-00001.parquet), a save_to_disk directory or one "
    f"parquet file. Get it with datasets.load_dataset({QM9_HUB_ID!r}, split='full')"
    ".save_to_disk(DIR), or `hf download --repo-type dataset "
    f"{QM9_HUB_ID} --local-dir DIR`, on a machine with network access"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def qm9_targets(names: Sequence[str] | None = None) -> tuple[QM9Target, ...]:
    """The protocol's targets, or those named (in the given order)."""
    if names is None:
        return QM9_TARGETS
    by_name = {t.name: t for t in QM9_TARGETS}
    unknown = [n for n in names if n not in by_name]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"QM9 targets {list(names)}: choose distinct names from {list(by_name)} "
            f"(unknown: {unknown})"
        )
    return tuple(by_name[n] for n in names)


def load_qm9_dump(
    source: str | os.PathLike, split: str | None = None, *, cache_dir: str | None = None
) -> datasets.Dataset:
    """The dump at ``source`` (module docstring): a local path or a hub id. ``split``: the
    dump's split (default: its only split). A missing local path, or a hub id that cannot be
    reached, raises FileNotFoundError naming it, the expected layout and where to get it."""
    path = Path(source)
    try:
        saved = ("state.json", "dataset_dict.json")  # save_to_disk of a Dataset / DatasetDict
        if path.is_dir() and any((path / name).is_file() for name in saved):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            loaded = datasets.load_dataset("parquet", data_files=str(path), cache_dir=cache_dir)
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
        elif _HUB_ID.match(str(source)) and not str(source).startswith((".", "/")):
            loaded = datasets.load_dataset(str(source), cache_dir=cache_dir)
        else:
            raise FileNotFoundError(f"no such file or directory: {str(source)!r}")
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise FileNotFoundError(
            f"QM9 dump {str(source)!r} could not be loaded ({err}). Expected {EXPECTED_LAYOUT}."
        ) from err
    if isinstance(loaded, datasets.Dataset):
        return loaded
    splits = list(loaded)
    if split is None:
        if len(splits) != 1:
            raise ValueError(
                f"QM9 dump {str(source)!r} has splits {splits}: choose one with split=..."
            )
        split = splits[0]
    if split not in loaded:
        raise ValueError(f"QM9 dump {str(source)!r}: no split {split!r}; it has {splits}")
    return loaded[split]


# ----------------------------------------------------------------------------- Arrow columns


def _combined(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _lists(array: pa.Array, name: str) -> tuple[np.ndarray, pa.Array]:
    """Lengths and flattened values of a list column (no nulls allowed)."""
    if not pa.types.is_list(array.type) and not pa.types.is_large_list(array.type):
        raise ValueError(f"QM9 column {name!r}: expected a list column, got {array.type}")
    if array.null_count:
        raise ValueError(f"QM9 column {name!r}: {array.null_count} null row(s)")
    return array.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64), array.flatten()


def _numbers(array: pa.Array, name: str, dtype: type) -> np.ndarray:
    if array.null_count:
        raise ValueError(f"QM9 column {name!r}: {array.null_count} null value(s)")
    return array.to_numpy(zero_copy_only=False).astype(dtype)  # a writable copy


def _rows(array: pa.Array, name: str, width: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """A list<list<number>> column whose inner lists have ``width`` entries: per-row lengths
    and the values as (total, width)."""
    lengths, inner = _lists(array, name)
    widths, values = _lists(inner, name)
    if len(widths) and (widths != width).any():
        bad = sorted(set(widths[widths != width].tolist()))
        raise ValueError(f"QM9 column {name!r}: expected rows of {width} values, got {bad}")
    return lengths, _numbers(values, name, dtype).reshape(-1, width)


def _targets(array: pa.Array) -> np.ndarray:
    """``y`` as (molecules, 19), from (1, 19) rows (PyG) or flat (19,) rows."""
    lengths, values = _lists(array, "y")
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        if len(lengths) and (lengths != 1).any():
            raise ValueError("QM9 column 'y': expected (1, 19) rows (PyG) or (19,) rows")
        lengths, values = _lists(values, "y")
    if len(lengths) and (lengths != QM9_NUM_PYG_TARGETS).any():
        bad = sorted(set(lengths[lengths != QM9_NUM_PYG_TARGETS].tolist()))
        raise ValueError(f"QM9 column 'y': expected {QM9_NUM_PYG_TARGETS} targets, got {bad}")
    return _numbers(values, "y", np.float64).reshape(-1, QM9_NUM_PYG_TARGETS)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


@dataclass
class _Molecules:
    """All molecules as flat arrays plus per-molecule offsets (no Python object per atom)."""

    atom_offsets: np.ndarray  # (M + 1,)
    atom_types: np.ndarray  # (atoms,) int64
    positions: np.ndarray  # (atoms, 3) float32
    targets: np.ndarray  # (M, 19) float64
    atom_features: np.ndarray | None = None  # (atoms, 11) float32
    edge_offsets: np.ndarray | None = None  # (M + 1,)
    edge_pairs: np.ndarray | None = None  # (edges, 2) int64, local atom indices
    edge_features: np.ndarray | None = None  # (edges, 4) float32


def _read_molecules(dataset: datasets.Dataset, use_pyg_features: bool) -> _Molecules:
    required = ["z", "pos", "y"] + (["x", "edge_index", "edge_attr"] if use_pyg_features else [])
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"QM9 dump: missing column(s) {missing} (has {dataset.column_names}); expected "
            f"{EXPECTED_LAYOUT}" + ("; or set use_pyg_features=False" if use_pyg_features else "")
        )
    table = dataset.select_columns(required).with_format("arrow")[:]
    column = {c: _combined(table.column(c)) for c in required}
    lengths, z = _lists(column["z"], "z")
    if len(lengths) and lengths.min() < 1:
        raise ValueError("QM9 column 'z': every molecule needs at least one atom")
    pos_lengths, pos = _rows(column["pos"], "pos", 3, np.float32)
    if not np.array_equal(pos_lengths, lengths):
        raise ValueError("QM9 columns 'z' and 'pos': different atom counts in some molecules")
    molecules = _Molecules(
        atom_offsets=_offsets(lengths),
        atom_types=_numbers(z, "z", np.int64),
        positions=pos,
        targets=_targets(column["y"]),
    )
    if not use_pyg_features:
        return molecules
    x_lengths, molecules.atom_features = _rows(column["x"], "x", PYG_ATOM_FEATURES, np.float32)
    if not np.array_equal(x_lengths, lengths):
        raise ValueError("QM9 columns 'z' and 'x': different atom counts in some molecules")
    rows, inner = _lists(column["edge_index"], "edge_index")
    if len(rows) and (rows != 2).any():
        raise ValueError("QM9 column 'edge_index': expected (2, E) per molecule")
    edge_lengths, flat = _lists(inner, "edge_index")
    flat = _numbers(flat, "edge_index", np.int64)
    source_row = np.repeat(np.arange(len(edge_lengths)) % 2, edge_lengths)
    pairs = np.stack([flat[source_row == 0], flat[source_row == 1]], axis=1)
    n_edges = edge_lengths[0::2]
    if not np.array_equal(n_edges, edge_lengths[1::2]):
        raise ValueError("QM9 column 'edge_index': its two rows differ in length")
    attr_lengths, molecules.edge_features = _rows(
        column["edge_attr"], "edge_attr", PYG_BOND_FEATURES, np.float32
    )
    if not np.array_equal(attr_lengths, n_edges):
        raise ValueError("QM9 columns 'edge_index' and 'edge_attr': different edge counts")
    atoms = np.repeat(lengths, n_edges)
    if len(pairs) and (pairs.min() < 0 or (pairs >= atoms[:, None]).any()):
        raise ValueError("QM9 column 'edge_index': an index is outside its molecule's atoms")
    molecules.edge_offsets = _offsets(n_edges)
    molecules.edge_pairs = pairs
    return molecules


# ----------------------------------------------------------------------------- datasets


class QM9Molecules(Dataset):
    """Molecules of one split: items ``atom_types`` (N,), ``positions`` (N, 3), optionally
    ``atom_features`` (N, 11) and ``bond_features`` (N, N, 4) (PyG's bond types on the complete
    graph, zeros for unbonded pairs), and one standardised float label ``labels_<task>`` per
    target. Batch them with :func:`collate_molecules`."""

    def __init__(
        self, molecules: _Molecules, ids: np.ndarray, labels: np.ndarray, tasks: Sequence[str]
    ) -> None:
        self._molecules = molecules
        self.ids = ids
        self.labels = labels.astype(np.float32)  # (len, tasks), standardised
        self.tasks = tuple(tasks)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        m = self._molecules
        mol = int(self.ids[i])
        a, b = m.atom_offsets[mol], m.atom_offsets[mol + 1]
        item = {
            "atom_types": torch.from_numpy(m.atom_types[a:b]),
            "positions": torch.from_numpy(m.positions[a:b]),
        }
        if m.atom_features is not None:
            item["atom_features"] = torch.from_numpy(m.atom_features[a:b])
            e0, e1 = m.edge_offsets[mol], m.edge_offsets[mol + 1]
            pairs = torch.from_numpy(m.edge_pairs[e0:e1])
            bonds = torch.zeros(b - a, b - a, PYG_BOND_FEATURES)
            bonds[pairs[:, 0], pairs[:, 1]] = torch.from_numpy(m.edge_features[e0:e1])
            item["bond_features"] = bonds
        for j, task in enumerate(self.tasks):
            item[f"labels_{task}"] = torch.tensor(self.labels[i, j])
        return item


def collate_molecules(features: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Pad a list of molecules to the largest: ``atom_types`` (B, N) with 0 at padding,
    ``positions`` (B, N, 3), ``atom_mask`` (B, N) bool, ``atom_features`` (B, N, F) and
    ``bond_features`` (B, N, N, F_b) when present (zeros at padding); every other key (the
    labels) is stacked."""
    if not features:
        raise ValueError("collate_molecules: empty batch")
    sizes = [len(f["atom_types"]) for f in features]
    b, n = len(features), max(sizes)
    batch: dict[str, Tensor] = {
        "atom_types": torch.zeros(b, n, dtype=torch.long),
        "positions": torch.zeros(b, n, 3),
        "atom_mask": torch.zeros(b, n, dtype=torch.bool),
    }
    first = features[0]
    if "atom_features" in first:
        batch["atom_features"] = torch.zeros(b, n, first["atom_features"].shape[-1])
    if "bond_features" in first:
        batch["bond_features"] = torch.zeros(b, n, n, first["bond_features"].shape[-1])
    for i, (f, size) in enumerate(zip(features, sizes, strict=True)):
        batch["atom_types"][i, :size] = f["atom_types"]
        batch["positions"][i, :size] = f["positions"]
        batch["atom_mask"][i, :size] = True
        if "atom_features" in batch:
            batch["atom_features"][i, :size] = f["atom_features"]
        if "bond_features" in batch:
            batch["bond_features"][i, :size, :size] = f["bond_features"]
    for key in first:
        if key not in batch:
            batch[key] = torch.stack([torch.as_tensor(f[key]) for f in features])
    return batch


@dataclass
class QM9Splits:
    """The three splits, the targets, and the training mean / std (PyG units) used to
    standardise them: label = (y - mean) / std."""

    train: QM9Molecules
    val: QM9Molecules
    test: QM9Molecules
    targets: tuple[QM9Target, ...]
    mean: np.ndarray
    std: np.ndarray

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def mae_scale(self) -> np.ndarray:
        """Per target, the factor from a standardised error to the reported unit: std x 1000
        for energies (eV -> meV), std otherwise."""
        return self.std * np.array([t.report_scale for t in self.targets])

    @property
    def max_atomic_number(self) -> int:
        return int(self.train._molecules.atom_types.max())


def qm9_splits(
    dataset: datasets.Dataset,
    *,
    targets: Sequence[str] | None = None,
    n_test: int = 10_000,
    n_val: int = 10_000,
    seed: int = 0,
    use_pyg_features: bool = False,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> QM9Splits:
    """Split a dump as the protocol does: one shuffle (``torch.randperm`` seeded ``seed``),
    the first ``n_test`` molecules for test, the next ``n_val`` for validation, the rest for
    training; standardise the chosen ``targets`` (default the protocol's 11) with the training
    split's mean and std (unbiased, as torch's). ``max_train_samples`` / ``max_eval_samples``
    keep the first molecules of the splits (the statistics stay those of the full training
    split)."""
    chosen = qm9_targets(targets)
    for name, value in (("n_test", n_test), ("n_val", n_val)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
    for name, value in (
        ("max_train_samples", max_train_samples),
        ("max_eval_samples", max_eval_samples),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name}={value!r} is invalid: expected None or an int >= 1")
    molecules = _read_molecules(dataset, use_pyg_features)
    total = len(molecules.targets)
    if n_test + n_val + 2 > total:
        raise ValueError(
            f"n_test={n_test} + n_val={n_val} leaves fewer than 2 of the {total} molecules for "
            "training; lower them"
        )
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).numpy()
    test_ids, val_ids = order[:n_test], order[n_test : n_test + n_val]
    train_ids = order[n_test + n_val :]
    y = molecules.targets[:, [t.index for t in chosen]]
    mean = y[train_ids].mean(0)
    std = y[train_ids].std(0, ddof=1)
    constant = [t.name for t, s in zip(chosen, std, strict=True) if not s > 0]
    if constant:
        raise ValueError(f"QM9 targets {constant} are constant on the training split")
    labels = (y - mean) / std
    names = [t.name for t in chosen]
    train_ids = train_ids[:max_train_samples]
    val_ids, test_ids = val_ids[:max_eval_samples], test_ids[:max_eval_samples]

    def split(ids: np.ndarray) -> QM9Molecules:
        return QM9Molecules(molecules, ids, labels[ids], names)

    return QM9Splits(split(train_ids), split(val_ids), split(test_ids), chosen, mean, std)


# ----------------------------------------------------------------------------- metrics


def qm9_compute_metrics(
    task_names: Sequence[str],
    mae_scale: Sequence[float],
    baselines: Mapping[str, float] | None = None,
) -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for ``APTTrainer`` on standardised targets: ``<task>/mae`` in the
    reported unit (|prediction - label| x ``mae_scale``, see :attr:`QM9Splits.mae_scale`) and,
    with ``baselines`` ({"<task>/mae": value}, e.g. :data:`QM9_BASELINE_MAE`), ``delta_m``
    over the tasks they name (lower is better)."""
    names = list(task_names)
    scale = [float(s) for s in mae_scale]
    if len(scale) != len(names) or not all(math.isfinite(s) and s > 0 for s in scale):
        raise ValueError(f"mae_scale={scale}: expected {len(names)} finite positive floats")
    base = {k: float(v) for k, v in (baselines or {}).items()}
    unknown = sorted(set(base) - {f"{n}/mae" for n in names})
    if unknown:
        raise ValueError(f"baselines {unknown} name no task of {names} ('<task>/mae')")
    metric = RegressionErrors(scale=scale, keep_in_memory=True)

    def compute_metrics(prediction: Any) -> dict[str, float]:
        columns = [
            (
                np.asarray(prediction.predictions[n], dtype=np.float64).reshape(-1),
                np.asarray(prediction.label_ids[n], dtype=np.float64).reshape(-1),
            )
            for n in names
        ]
        predictions = np.stack([p for p, _ in columns], axis=1)
        references = np.stack([r for _, r in columns], axis=1)
        errors = metric.compute(predictions=predictions, references=references)
        out = {f"{n}/mae": float(v) for n, v in zip(names, errors["mae_per_target"], strict=True)}
        if base:
            out["delta_m"] = delta_m(out, base, dict.fromkeys(base, False))
        return out

    return compute_metrics


__all__ = [
    "EXPECTED_LAYOUT",
    "QM9_BASELINE_MAE",
    "QM9_HUB_ID",
    "QM9_TARGETS",
    "QM9Molecules",
    "QM9Splits",
    "QM9Target",
    "collate_molecules",
    "load_qm9_dump",
    "qm9_compute_metrics",
    "qm9_splits",
    "qm9_targets",
]
