"""QM9: 11 molecular property regressions on one MPNN (the Nash-MTL / FAMO protocol).

    accelerate launch recipes/qm9.py --config recipes/configs/qm9.yaml [overrides]
    accelerate launch recipes/qm9.py --config recipes/configs/qm9.yaml \\
        --dataset /data/qm9 --mtl_method nash_mtl --apt_optimizer adamw

Data (apt_hf.data.qm9): a QM9 dump in PyG's layout (columns z, pos, y, and x / edge_index /
edge_attr for the PyG features), a hub id (default ``lisn519010/QM9``, split ``full``) or a local
copy; offline, pass ``--dataset DIR`` (the error message of a missing dump says how to get one).
PyG targets [0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11]; one seeded shuffle, first ``n_test``
(10,000) molecules for test, next ``n_val`` (10,000) for validation, the rest for training;
targets standardised with the training mean / std; ``<task>/mae`` reported in original units,
the energies (homo, lumo, zpve, u0, u, h, g) in meV, and ``delta_m`` against the published
single-task MAEs (``--task_baselines '{...}'`` replaces them, ``'{}'`` turns it off).

Model: the protocol's network, an MPNN (edge network + GRU, Set2Set readout; apt_hf.modeling.mpnn)
in plain torch as a transformers backbone, because it is what the published baselines and
Delta_m% numbers were measured with: a different backbone would make them incomparable. Its
inputs: PyG's 11 atom features plus an embedding of the atomic number, and on the complete graph
a Gaussian expansion of the distance plus PyG's 4 bond types (the protocol feeds the raw
distance; the expansion is the usual, smoother encoding). ``--pyg_features false`` uses only
atomic numbers and positions. One linear head per target on the pooled vector (no dropout).

The config reproduces the protocol's schedule: Adam(W) lr 1e-3 without weight decay, batch 120,
300 epochs, ReduceLROnPlateau(factor 0.7, patience 5, min 1e-5) on the validation Delta_m%, and
the test metrics of the epoch with the best validation Delta_m% (``eval_split: both``; metrics
are ``eval_val_*`` / ``eval_test_*``). Single-task baselines: ``--tasks mu``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import set_seed

from apt_hf import MultiTaskConfig, TaskSpec
from apt_hf.data.qm9 import (
    PYG_ATOM_FEATURES,
    PYG_BOND_FEATURES,
    QM9_BASELINE_MAE,
    QM9_HUB_ID,
    QM9_TARGETS,
    QM9Splits,
    collate_molecules,
    load_qm9_dump,
    qm9_compute_metrics,
    qm9_splits,
)
from apt_hf.modeling.mpnn import MolecularMultiTaskModel, MPNNConfig
from apt_hf.recipes import parse_recipe_args, run_recipe

EVAL_SPLITS = ("val", "test", "both")


@dataclass
class DataArguments:
    dataset: str = field(
        default=QM9_HUB_ID,
        metadata={
            "help": "Hub id or local path (directory or parquet file) of a PyG-layout QM9 "
            "dump (apt_hf.data.qm9)."
        },
    )
    dataset_split: str | None = field(
        default=None, metadata={"help": "Split of the dump (default: its only split)."}
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache directory of datasets.load_dataset."}
    )
    tasks: str = field(
        default=",".join(t.name for t in QM9_TARGETS),
        metadata={"help": "Comma-separated targets (one for a single-task baseline)."},
    )
    n_test: int = field(default=10_000, metadata={"help": "First molecules after the shuffle."})
    n_val: int = field(default=10_000, metadata={"help": "Next molecules: validation."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the one shuffle."})
    eval_split: str = field(
        default="both",
        metadata={
            "help": "Evaluated split(s); 'both' reports eval_val_* and eval_test_*.",
            "choices": list(EVAL_SPLITS),
        },
    )
    pyg_features: bool = field(
        default=True,
        metadata={
            "help": "Use PyG's 11 atom features and 4 bond types (columns x, edge_index, "
            "edge_attr) besides atomic numbers and distances."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N training molecules (debugging)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N validation / test molecules."}
    )


@dataclass
class ModelArguments:
    backbone: str | None = field(
        default=None,
        metadata={
            "help": "Directory of a saved MPNNModel; default: a new one from the options below."
        },
    )
    hidden_size: int = field(default=64, metadata={"help": "Width of the atom states."})
    num_message_steps: int = field(default=3, metadata={"help": "Message-passing steps."})
    edge_hidden_size: int = field(default=128, metadata={"help": "Edge network hidden width."})
    num_rbf: int = field(default=50, metadata={"help": "Gaussians expanding each distance."})
    rbf_max: float = field(default=10.0, metadata={"help": "Last Gaussian centre (Angstrom)."})
    set2set_steps: int = field(default=3, metadata={"help": "Set2Set readout iterations."})


def build_model(
    model_args: ModelArguments, splits: QM9Splits, pyg_features: bool
) -> MolecularMultiTaskModel:
    specs = [TaskSpec(name=name, type="regression") for name in splits.task_names]
    if model_args.backbone is not None:
        return MolecularMultiTaskModel.from_backbone(
            model_args.backbone, tasks=specs, head_dropout=0.0
        )
    backbone = MPNNConfig(
        hidden_size=model_args.hidden_size,
        num_message_steps=model_args.num_message_steps,
        edge_hidden_size=model_args.edge_hidden_size,
        num_rbf=model_args.num_rbf,
        rbf_max=model_args.rbf_max,
        set2set_steps=model_args.set2set_steps,
        num_atom_types=max(10, splits.max_atomic_number + 1),
        num_atom_features=PYG_ATOM_FEATURES if pyg_features else 0,
        num_bond_features=PYG_BOND_FEATURES if pyg_features else 0,
    )
    config = MultiTaskConfig(
        backbone_config=backbone, tasks=[s.to_dict() for s in specs], head_dropout=0.0
    )
    return MolecularMultiTaskModel(config)


def _check_best_metric(metric: str | None, eval_split: str) -> None:
    """metric_for_best_model must name a split that is evaluated (eval_val_* with 'both')."""
    if metric is None:
        return
    name = metric.removeprefix("eval_")
    prefixed = name.startswith(("val_", "test_"))
    if eval_split == "both" and not prefixed:
        raise ValueError(
            f"metric_for_best_model={metric!r}: with eval_split='both' name the split, e.g. "
            f"'val_{name}'"
        )
    if eval_split != "both" and prefixed:
        raise ValueError(
            f"metric_for_best_model={metric!r}: eval_split={eval_split!r} reports unprefixed "
            f"metrics, e.g. {name.split('_', 1)[1]!r}"
        )


def main(argv: list[str] | None = None) -> dict[str, float]:
    args, data_args, model_args = parse_recipe_args((DataArguments, ModelArguments), argv)
    if data_args.eval_split not in EVAL_SPLITS:
        raise ValueError(f"eval_split={data_args.eval_split!r}: choose one of {EVAL_SPLITS}")
    _check_best_metric(args.metric_for_best_model, data_args.eval_split)
    tasks = [t.strip() for t in data_args.tasks.split(",") if t.strip()]
    dump = load_qm9_dump(
        data_args.dataset, data_args.dataset_split, cache_dir=data_args.dataset_cache_dir
    )
    splits = qm9_splits(
        dump,
        targets=tasks,
        n_test=data_args.n_test,
        n_val=data_args.n_val,
        seed=data_args.split_seed,
        use_pyg_features=data_args.pyg_features,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
    )
    baselines = args.task_baselines
    if baselines is None:  # the published single-task MAEs ('{}' turns Delta_m% off)
        baselines = {k: v for k, v in QM9_BASELINE_MAE.items() if k.split("/")[0] in tasks}
    compute_metrics = qm9_compute_metrics(splits.task_names, splits.mae_scale, baselines)
    set_seed(args.seed)
    model = build_model(model_args, splits, data_args.pyg_features)
    evaluation = (
        {"val": splits.val, "test": splits.test}
        if data_args.eval_split == "both"
        else getattr(splits, data_args.eval_split)
    )
    return run_recipe(
        "qm9",
        model,
        args,
        splits.train,
        evaluation,
        data_collator=collate_molecules,
        compute_metrics=compute_metrics,
    )


if __name__ == "__main__":
    main()
