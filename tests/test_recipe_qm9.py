"""QM9 recipe: a tiny fabricated PyG-layout dump, the split and standardisation, MAE in original
units, the MPNN's invariances, save / from_pretrained, and an end-to-end run (offline, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from apt_hf.data.qm9 import (
    QM9_BASELINE_MAE,
    QM9_TARGETS,
    collate_molecules,
    load_qm9_dump,
    qm9_compute_metrics,
    qm9_splits,
)
from apt_hf.modeling import MultiTaskConfig, MultiTaskModel, TaskSpec
from apt_hf.modeling.mpnn import MolecularMultiTaskModel, MPNNConfig, MPNNModel

ROOT = Path(__file__).resolve().parents[1]
N_MOLECULES = 60
TASKS = [t.name for t in QM9_TARGETS]


def fabricate_dump(n: int = N_MOLECULES, seed: int = 0) -> datasets.Dataset:
    """Molecules of 3-9 atoms in PyG's layout: random positions, atom features, bonds and 19
    targets of very different scales and offsets."""
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-2, 2, size=19)
    offsets = rng.normal(size=19) * scales * 3
    rows: dict[str, list] = {k: [] for k in ("x", "edge_index", "edge_attr", "y", "pos", "z")}
    rows.update(name=[], idx=[])
    for i in range(n):
        atoms = int(rng.integers(3, 10))
        pairs = [(a, b) for a in range(atoms) for b in range(atoms) if a < b]
        chosen = [pairs[k] for k in rng.choice(len(pairs), size=atoms - 1, replace=False)]
        src = [a for a, b in chosen] + [b for a, b in chosen]
        dst = [b for a, b in chosen] + [a for a, b in chosen]
        bond = np.eye(4)[rng.integers(0, 4, size=len(chosen))]
        rows["z"].append(rng.choice([1, 6, 7, 8, 9], size=atoms).tolist())
        rows["pos"].append((rng.normal(size=(atoms, 3)) * 1.5).tolist())
        rows["x"].append(rng.normal(size=(atoms, 11)).tolist())
        rows["edge_index"].append([src, dst])
        rows["edge_attr"].append(np.concatenate([bond, bond]).tolist())
        rows["y"].append([(offsets + scales * rng.normal(size=19)).tolist()])
        rows["name"].append(f"gdb_{i + 1}")
        rows["idx"].append([i])
    return datasets.Dataset.from_dict(rows)


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dump written as the hub copy stores it: data/full-00000-of-00001.parquet."""
    root = tmp_path_factory.mktemp("qm9")
    (root / "data").mkdir()
    fabricate_dump().to_parquet(str(root / "data" / "full-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def dump(dump_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> datasets.Dataset:
    return load_qm9_dump(dump_dir, cache_dir=str(tmp_path_factory.mktemp("cache")))


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_qm9", ROOT / "recipes" / "qm9.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the string annotations through it
    spec.loader.exec_module(module)
    return module


def tiny_mpnn(**kwargs: object) -> MPNNConfig:
    options = dict(hidden_size=16, edge_hidden_size=8, num_rbf=6, set2set_steps=2)
    return MPNNConfig(**{**options, **kwargs})


# ----------------------------------------------------------------------------- data


def test_split_sizes_targets_and_standardisation(dump: datasets.Dataset) -> None:
    splits = qm9_splits(dump, n_test=10, n_val=12, seed=3, use_pyg_features=True)
    assert (len(splits.test), len(splits.val), len(splits.train)) == (10, 12, 38)
    ids = [set(s.ids.tolist()) for s in (splits.test, splits.val, splits.train)]
    assert set.union(*ids) == set(range(N_MOLECULES)) and sum(map(len, ids)) == N_MOLECULES
    # one seeded torch.randperm: first n_test test, next n_val val
    order = torch.randperm(N_MOLECULES, generator=torch.Generator().manual_seed(3)).tolist()
    assert splits.test.ids.tolist() == order[:10] and splits.val.ids.tolist() == order[10:22]
    other = qm9_splits(dump, n_test=10, n_val=12, seed=4)
    assert other.test.ids.tolist() != splits.test.ids.tolist()

    y = np.array([row[0] for row in dump["y"]])[:, [t.index for t in QM9_TARGETS]]
    train = splits.train.labels.astype(np.float64)
    np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(train.std(0, ddof=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(splits.mean, y[splits.train.ids].mean(0))
    np.testing.assert_allclose(splits.std, y[splits.train.ids].std(0, ddof=1))
    # labels are the chosen PyG columns, standardised with the training statistics
    np.testing.assert_allclose(
        splits.test.labels * splits.std + splits.mean, y[splits.test.ids], rtol=1e-5
    )
    assert [t.index for t in QM9_TARGETS] == [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]
    energies = [t.name for t in QM9_TARGETS if t.energy]
    assert energies == ["homo", "lumo", "zpve", "u0", "u", "h", "g"]
    np.testing.assert_allclose(
        splits.mae_scale, splits.std * [1000.0 if t.energy else 1.0 for t in QM9_TARGETS]
    )

    small = qm9_splits(dump, n_test=10, n_val=12, seed=3, max_train_samples=5, max_eval_samples=4)
    assert (len(small.train), len(small.val), len(small.test)) == (5, 4, 4)
    np.testing.assert_allclose(small.std, splits.std)  # statistics of the full training split
    with pytest.raises(ValueError, match="n_test=50 \\+ n_val=12"):
        qm9_splits(dump, n_test=50, n_val=12)
    with pytest.raises(ValueError, match="choose distinct names"):
        qm9_splits(dump, targets=["mu", "gap"])


def test_items_and_collator_padding(dump: datasets.Dataset) -> None:
    splits = qm9_splits(dump, n_test=10, n_val=10, use_pyg_features=True)
    items = [splits.train[i] for i in range(4)]
    sizes = [len(item["atom_types"]) for item in items]
    row = dump[int(splits.train.ids[0])]
    assert items[0]["atom_types"].tolist() == row["z"]
    np.testing.assert_allclose(items[0]["positions"].numpy(), row["pos"], rtol=1e-6)
    bonds = items[0]["bond_features"]
    for a, b, attr in zip(*row["edge_index"], row["edge_attr"], strict=True):
        assert bonds[a, b].tolist() == attr
    assert bonds.sum() == len(row["edge_attr"])  # zeros for unbonded pairs

    batch = collate_molecules(items)
    n = max(sizes)
    assert batch["atom_types"].shape == (4, n) and batch["positions"].shape == (4, n, 3)
    assert batch["atom_features"].shape == (4, n, 11)
    assert batch["bond_features"].shape == (4, n, n, 4)
    assert batch["atom_mask"].sum(1).tolist() == sizes
    assert ((batch["atom_types"] > 0) == batch["atom_mask"]).all()
    assert batch["positions"][~batch["atom_mask"]].abs().sum() == 0
    assert set(batch) >= {f"labels_{t}" for t in TASKS}
    assert batch["labels_mu"].shape == (4,) and batch["labels_mu"].dtype == torch.float32


def test_mae_in_original_units_by_hand(dump: datasets.Dataset) -> None:
    """Predicting 0 (the training mean) everywhere: MAE = mean |y - mean_train| in PyG units,
    x1000 for the energies; delta_m as the protocol defines it."""
    splits = qm9_splits(dump, n_test=10, n_val=12)
    test = splits.test
    prediction = SimpleNamespace(
        predictions={t: np.zeros((len(test), 1), np.float32) for t in TASKS},
        label_ids={t: test.labels[:, j] for j, t in enumerate(TASKS)},
    )
    metrics = qm9_compute_metrics(TASKS, splits.mae_scale, QM9_BASELINE_MAE)(prediction)
    y = np.array([dump[int(i)]["y"][0] for i in test.ids])
    expected = {}
    for j, target in enumerate(QM9_TARGETS):
        error = np.abs(y[:, target.index] - splits.mean[j]).mean()
        expected[f"{target.name}/mae"] = error * (1000.0 if target.energy else 1.0)
        assert metrics[f"{target.name}/mae"] == pytest.approx(
            expected[f"{target.name}/mae"], rel=1e-5
        )
    base = dict(QM9_BASELINE_MAE)
    by_hand = 100.0 / 11 * sum((expected[k] - base[k]) / base[k] for k in base)
    assert metrics["delta_m"] == pytest.approx(by_hand, rel=1e-5)
    assert base["homo/mae"] == 60.576 and base["cv/mae"] == 0.07212


def test_missing_dump_and_columns_raise_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no_qm9_here"
    with pytest.raises(FileNotFoundError) as info:
        load_qm9_dump(missing)
    message = str(info.value)
    for needle in (str(missing), "z (atomic", "pos", "y ((1, 19)", "lisn519010/QM9"):
        assert needle in message
    no_pos = fabricate_dump(8).remove_columns(["pos"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['pos'\]"):
        qm9_splits(no_pos, n_test=2, n_val=2)
    no_bonds = fabricate_dump(8).remove_columns(["edge_attr"])
    with pytest.raises(ValueError, match="use_pyg_features=False"):
        qm9_splits(no_bonds, n_test=2, n_val=2, use_pyg_features=True)
    assert len(qm9_splits(no_bonds, n_test=2, n_val=2).train) == 4


def test_dump_as_parquet_file_or_saved_dataset(tmp_path: Path) -> None:
    small = fabricate_dump(6)
    small.to_parquet(str(tmp_path / "qm9.parquet"))
    cache = str(tmp_path / "cache")
    assert load_qm9_dump(tmp_path / "qm9.parquet", cache_dir=cache)["z"] == small["z"]
    small.save_to_disk(str(tmp_path / "saved"))
    assert load_qm9_dump(tmp_path / "saved")["y"] == small["y"]
    datasets.DatasetDict(full=small, extra=small).save_to_disk(str(tmp_path / "dict"))
    assert load_qm9_dump(tmp_path / "dict", "full")["pos"] == small["pos"]
    with pytest.raises(ValueError, match="has splits \\['full', 'extra'\\]"):
        load_qm9_dump(tmp_path / "dict")
    with pytest.raises(ValueError, match="no split 'train'"):
        load_qm9_dump(tmp_path / "dict", "train")


# ----------------------------------------------------------------------------- model


def molecule(atoms: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    bonds = torch.rand(atoms, atoms, 4, generator=generator)
    return {
        "atom_types": torch.randint(1, 10, (atoms,), generator=generator),
        "positions": torch.randn(atoms, 3, generator=generator) * 1.5,
        "atom_features": torch.randn(atoms, 11, generator=generator),
        "bond_features": bonds + bonds.transpose(0, 1),
    }


def test_mpnn_is_invariant_to_atom_order_and_padding() -> None:
    torch.manual_seed(0)
    model = MPNNModel(tiny_mpnn(num_atom_features=11, num_bond_features=4)).eval()
    g = torch.Generator().manual_seed(1)
    mol, other = molecule(7, g), molecule(4, g)
    alone = model(**collate_molecules([mol])).pooler_output[0]

    perm = torch.randperm(7, generator=g)
    permuted = {k: v[perm] for k, v in mol.items()}
    permuted["bond_features"] = mol["bond_features"][perm][:, perm]
    out = model(**collate_molecules([permuted]))
    torch.testing.assert_close(out.pooler_output[0], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(
        out.last_hidden_state[0], model(**collate_molecules([mol])).last_hidden_state[0]
    )  # atom states move with the atoms

    # padded next to a bigger molecule, and with extra padding atoms
    batch = collate_molecules([other, mol])
    torch.testing.assert_close(model(**batch).pooler_output[1], alone, rtol=1e-5, atol=1e-6)
    padded = collate_molecules([mol, molecule(9, g)])
    padded = {k: v[:1] for k, v in padded.items()}
    padded["positions"][0, 7:] = 123.0  # garbage at the padding is ignored
    out = model(**padded)
    torch.testing.assert_close(out.pooler_output[0], alone, rtol=1e-5, atol=1e-6)
    assert out.last_hidden_state[0, 7:].abs().sum() == 0


def test_edge_network_matches_explicit_per_edge_matrices() -> None:
    """The factorised message equals NNConv's: sum_j w_ij h_j @ reshape(A g_ij + a)."""
    torch.manual_seed(0)
    model = MPNNModel(tiny_mpnn())
    conv, d = model.conv, 16
    b, n = 2, 5
    h = torch.randn(b, n, d)
    edges = torch.randn(b, n, n, 6)
    weights = torch.rand(b, n, n)
    gates = conv.edge_gates(edges, weights)
    matrices = conv.edge_out(torch.relu(conv.edge_in(edges))).view(b, n, n, d, d)
    explicit = torch.einsum("bij,bjd,bijdo->bio", weights, h, matrices) + conv.root(h)
    torch.testing.assert_close(conv(h, gates, weights), explicit, rtol=1e-4, atol=1e-5)


def test_input_checks() -> None:
    model = MPNNModel(tiny_mpnn(num_bond_features=4))
    z, pos = torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, 3)
    with pytest.raises(ValueError, match="bond_features .* is required"):
        model(z, pos)
    with pytest.raises(ValueError, match="positions must have shape"):
        model(z, torch.zeros(1, 3, 2), bond_features=torch.zeros(1, 3, 3, 4))
    with pytest.raises(ValueError, match="num_rbf=1"):
        MPNNConfig(num_rbf=1)
    bert = {
        "model_type": "bert",
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 8,
    }
    with pytest.raises(ValueError, match="not molecules"):
        regression = [TaskSpec("a", type="regression")]
        MolecularMultiTaskModel(MultiTaskConfig(backbone_config=bert, tasks=regression))


def test_save_and_from_pretrained_round_trip(tmp_path: Path) -> None:
    specs = [TaskSpec(name, type="regression") for name in TASKS]
    config = MultiTaskConfig(
        backbone_config=tiny_mpnn(num_atom_features=11, num_bond_features=4), tasks=specs
    )
    assert type(MultiTaskModel(config).backbone) is MPNNModel  # AutoModel knows apt-mpnn
    torch.manual_seed(0)
    model = MolecularMultiTaskModel(config).eval()
    assert model.task_names == TASKS
    assert model.head_module_names() == [f"heads.{t}" for t in TASKS]
    assert all(n.startswith("backbone.") for n, _ in model.shared_parameters())
    model.save_pretrained(tmp_path / "model")
    loaded = MolecularMultiTaskModel.from_pretrained(tmp_path / "model")
    assert type(AutoConfig.from_pretrained(tmp_path / "model").backbone_config) is MPNNConfig
    assert [s.to_dict() for s in loaded.config.task_specs] == [s.to_dict() for s in specs]
    state, reloaded = model.state_dict(), loaded.state_dict()
    assert state.keys() == reloaded.keys()
    for key in state:
        torch.testing.assert_close(reloaded[key], state[key], rtol=0, atol=0)
    g = torch.Generator().manual_seed(2)
    batch = collate_molecules([molecule(5, g), molecule(8, g)])
    a, b = model(**batch).logits, loaded(**batch).logits
    for task in TASKS:
        torch.testing.assert_close(a[task], b[task])

    model.backbone.save_pretrained(tmp_path / "backbone")
    backbone = AutoModel.from_pretrained(tmp_path / "backbone")
    assert type(backbone) is MPNNModel
    again = MolecularMultiTaskModel.from_backbone(tmp_path / "backbone", tasks=specs)
    torch.testing.assert_close(
        again.backbone(**batch).pooler_output, model.backbone(**batch).pooler_output
    )


# ----------------------------------------------------------------------------- recipe


def test_recipe_end_to_end(dump_dir: Path, tmp_path: Path) -> None:
    """The shipped YAML with tiny overrides: MPNN + PCGrad + APT-Muon, plateau scheduler and
    best-checkpoint selection on val Delta_m, results.json with 11 finite MAEs per split."""
    recipe = load_recipe()
    out = tmp_path / "out"
    metrics = recipe.main(
        [
            "--config",
            str(ROOT / "recipes" / "configs" / "qm9.yaml"),
            "--dataset",
            str(dump_dir),
            "--dataset_cache_dir",
            str(tmp_path / "cache"),
            "--n_test",
            "10",
            "--n_val",
            "10",
            "--hidden_size",
            "16",
            "--edge_hidden_size",
            "8",
            "--num_rbf",
            "8",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "8",
            "--per_device_eval_batch_size",
            "16",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--logging_steps",
            "1",
            "--dataloader_num_workers",
            "0",
            "--mtl_method",
            "pcgrad",
            "--apt_optimizer",
            "muon",
            "--output_dir",
            str(out),
            "--report_to",
            "none",
            "--use_cpu",
            "true",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["recipe"] == "qm9" and results["config"]["mtl_method"] == "pcgrad"
    for split in ("val", "test"):
        maes = {
            k: v
            for k, v in results["metrics"].items()
            if k.startswith(f"eval_{split}_") and k.endswith("/mae")
        }
        assert sorted(maes) == sorted(f"eval_{split}_{t}/mae" for t in TASKS)
        assert all(math.isfinite(v) and v > 0 for v in maes.values())
        assert math.isfinite(results["metrics"][f"eval_{split}_delta_m"])
    assert metrics["eval_test_delta_m"] == results["metrics"]["eval_test_delta_m"]
    losses = [e for e in results["log_history"] if "loss/mu" in e]
    assert len(losses) == 3 and all(math.isfinite(e["loss/mu"]) for e in losses)
    saved = MolecularMultiTaskModel.from_pretrained(out)
    assert saved.task_names == TASKS and saved.config.backbone_config.num_bond_features == 4


def test_recipe_rejects_a_best_metric_of_an_unevaluated_split(dump_dir: Path) -> None:
    recipe = load_recipe()
    with pytest.raises(ValueError, match="name the split"):
        recipe.main(
            [
                "--config",
                str(ROOT / "recipes" / "configs" / "qm9.yaml"),
                "--dataset",
                str(dump_dir),
                "--metric_for_best_model",
                "delta_m",
                "--output_dir",
                "unused",
                "--use_cpu",
                "true",
            ]
        )
