"""MPNN: a message-passing network for molecules as a transformers backbone, in plain torch.

Gilmer et al., Neural Message Passing for Quantum Chemistry, ICML 2017: the variant MTL papers
use on QM9 (Nash-MTL, FAMO; PyG's ``NNConv`` + ``GRU`` + ``Set2Set``). On the complete graph
over a molecule's atoms, one edge network (shared by all steps) turns each pair's features
e_ij (a Gaussian expansion of the distance d_ij, plus bond-type features when given) into a
matrix that carries h_j to i; a GRU updates the atom states; Set2Set reads them out:

    h_i^0     = relu(E[z_i] + W_x x_i)
    W(e_ij)   = reshape(A relu(U e_ij + c) + a)                 (hidden x hidden)
    m_i^t     = W_root h_i^t + b + (1 / deg_i) sum_{j != i} W(e_ij)^T h_j^t
    h_i^{t+1} = GRU(relu(m_i^t), h_i^t)
    pooled    = relu(W_out Set2Set(h^T))                         (batch, hidden)

The per-edge matrices are never materialised: with g_ij = relu(U e_ij + c) the message is
sum_k g_ijk (A_k^T h_j), computed as two contractions (same result as NNConv, far less memory).

Batches are padded: ``atom_types`` (B, N) atomic numbers with 0 = padding, ``positions``
(B, N, 3), ``atom_mask`` (B, N) (default ``atom_types > 0``), optionally ``atom_features``
(B, N, F) and ``bond_features`` (B, N, N, F_b). Padding atoms neither send nor receive
messages and are left out of the readout, so the output does not depend on the padding, and
it is invariant to the order of the atoms.

:class:`MolecularMultiTaskModel` is :class:`MultiTaskModel` with a forward that takes these
molecular inputs (``MultiTaskModel.forward`` passes only ``input_ids`` / ``attention_mask`` /
``token_type_ids`` / ``pixel_values`` to its backbone). Importing this module registers
``MPNNConfig`` / ``MPNNModel`` (model type ``"apt-mpnn"``) with ``AutoConfig`` / ``AutoModel``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration import SEQUENCE_TASKS, MultiTaskConfig
from .heads import task_loss
from .modeling import MultiTaskModel, MultiTaskOutput

# Keyword arguments of the molecular forward; a task's label column may not shadow them.
MOLECULE_INPUTS: tuple[str, ...] = (
    "atom_types",
    "positions",
    "atom_mask",
    "atom_features",
    "bond_features",
)


class MPNNConfig(PreTrainedConfig):
    """Configuration of an :class:`MPNNModel`.

    ``hidden_size``: width of the atom states and of the pooled output. ``num_message_steps``:
    message-passing steps (one edge network and one GRU shared by all). ``edge_hidden_size``:
    hidden width of the edge network. ``num_rbf`` Gaussians with centres evenly spaced on
    [0, ``rbf_max``] (distance units, Angstrom for QM9) expand each distance, width = spacing.
    ``set2set_steps``: Set2Set readout iterations. ``num_atom_types``: size of the atom-type
    embedding (atomic numbers 1 .. num_atom_types - 1; 0 is padding).
    ``num_atom_features`` / ``num_bond_features``: widths of the optional per-atom / per-pair
    input features (0: not used; e.g. PyG QM9's 11 atom features and 4 bond types).
    """

    model_type = "apt-mpnn"

    hidden_size: int = 64
    num_message_steps: int = 3
    edge_hidden_size: int = 128
    num_rbf: int = 50
    rbf_max: float = 10.0
    set2set_steps: int = 3
    num_atom_types: int = 10
    num_atom_features: int = 0
    num_bond_features: int = 0

    def __post_init__(self, **kwargs: Any) -> None:
        positive = ("hidden_size", "num_message_steps", "edge_hidden_size", "set2set_steps")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("num_rbf", self.num_rbf, minimum=2)
        _check_int("num_atom_types", self.num_atom_types, minimum=2)
        for name in ("num_atom_features", "num_bond_features"):
            _check_int(name, getattr(self, name), minimum=0)
        rbf_max = self.rbf_max
        if (
            isinstance(rbf_max, bool)
            or not isinstance(rbf_max, (int, float))
            or not (math.isfinite(rbf_max) and rbf_max > 0)
        ):
            raise ValueError(f"MPNNConfig.rbf_max={rbf_max!r} is invalid: expected a float > 0")
        self.rbf_max = float(rbf_max)
        super().__post_init__(**kwargs)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MPNNConfig.{name}={value!r} is invalid: expected an int >= {minimum}")


def gaussian_rbf(distances: Tensor, num: int, max_distance: float) -> Tensor:
    """exp(-(d - mu_k)^2 / (2 s^2)) for centres mu_k = k s, k = 0 .. num - 1, s = max / (num - 1).
    Shape (...,) -> (..., num)."""
    spacing = max_distance / (num - 1)
    centres = torch.linspace(0.0, max_distance, num, device=distances.device)
    return torch.exp(-0.5 * ((distances.unsqueeze(-1) - centres) / spacing) ** 2)


class EdgeNetworkConv(nn.Module):
    """NNConv with mean aggregation and a two-layer edge network, factorised.

    m_i = W_root h_i + b + sum_j w_ij (A relu(U e_ij + c) + a)^T h_j  with w_ij = 1 / deg_i on
    edges, 0 elsewhere; reshape(A g + a) is the (in, out) matrix of PyG's NNConv.
    """

    def __init__(self, hidden_size: int, edge_features: int, edge_hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.edge_in = nn.Linear(edge_features, edge_hidden_size)
        self.edge_out = nn.Linear(edge_hidden_size, hidden_size * hidden_size)
        self.root = nn.Linear(hidden_size, hidden_size)

    def edge_gates(self, edge_features: Tensor, edge_weights: Tensor) -> Tensor:
        """w_ij relu(U e_ij + c), computed once for all steps: (B, N, N, E) -> (B, N, K, N),
        the layout the message contraction reads."""
        gates = F.relu(self.edge_in(edge_features)) * edge_weights.unsqueeze(-1)
        return gates.transpose(2, 3).contiguous()

    def forward(self, h: Tensor, gates: Tensor, edge_weights: Tensor) -> Tensor:
        b, n, k, _ = gates.shape
        d = self.hidden_size
        # [(k, in), out] blocks of reshape(A g + a): W_k = A_k viewed as (in, out)
        matrices = self.edge_out.weight.view(d, d, k).permute(2, 0, 1).reshape(k * d, d)
        offset = self.edge_out.bias.view(d, d)
        gathered = torch.bmm(gates.view(b, n * k, n), h)  # sum_j w_ij g_ijk h_j
        messages = gathered.view(b, n, k * d) @ matrices
        messages = messages + torch.bmm(edge_weights, h) @ offset
        return messages + self.root(h)


class Set2Set(nn.Module):
    """Set2Set readout (Vinyals et al., 2016) over the real atoms: (B, N, D) -> (B, 2D)."""

    def __init__(self, hidden_size: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.lstm = nn.LSTMCell(2 * hidden_size, hidden_size)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        b, _, d = h.shape
        q_star = h.new_zeros(b, 2 * d)
        state = (h.new_zeros(b, d), h.new_zeros(b, d))
        lowest = torch.finfo(h.dtype).min
        for _ in range(self.steps):
            state = self.lstm(q_star, state)
            q = state[0]
            scores = (h * q.unsqueeze(1)).sum(-1).masked_fill(~mask, lowest)
            attention = torch.softmax(scores, dim=1) * mask.to(h.dtype)
            q_star = torch.cat([q, (attention.unsqueeze(-1) * h).sum(1)], dim=-1)
        return q_star


class MPNNPreTrainedModel(PreTrainedModel):
    """Weight initialisation (PyTorch's layer defaults, as PyG's MPNN uses) and config class."""

    config_class = MPNNConfig
    config: MPNNConfig
    base_model_prefix = "mpnn"
    main_input_name = "atom_types"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.GRUCell, nn.LSTMCell)):
            bound = 1.0 / math.sqrt(module.hidden_size)
            for param in module.parameters():
                init.uniform_(param, -bound, bound)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
            if module.padding_idx is not None and not getattr(
                module.weight, "_is_hf_initialized", False
            ):
                init.zeros_(module.weight[module.padding_idx])


class MPNNModel(MPNNPreTrainedModel):
    """MPNN backbone: ``last_hidden_state`` (B, N, hidden) atom states (0 at padding) and
    ``pooler_output`` (B, hidden), the Set2Set readout after a linear layer and ReLU."""

    def __init__(self, config: MPNNConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.atom_embedding = nn.Embedding(config.num_atom_types, d, padding_idx=0)
        self.atom_projection = (
            nn.Linear(config.num_atom_features, d, bias=False) if config.num_atom_features else None
        )
        self.conv = EdgeNetworkConv(
            d, config.num_rbf + config.num_bond_features, config.edge_hidden_size
        )
        self.gru = nn.GRUCell(d, d)
        self.set2set = Set2Set(d, config.set2set_steps)
        self.readout = nn.Linear(2 * d, d)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.atom_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.atom_embedding = value

    def _check_inputs(
        self,
        atom_types: Tensor,
        positions: Tensor,
        atom_mask: Tensor | None,
        atom_features: Tensor | None,
        bond_features: Tensor | None,
    ) -> None:
        name = type(self).__name__
        if not isinstance(atom_types, Tensor) or atom_types.ndim != 2:
            raise ValueError(f"{name}: atom_types must be a (batch, atoms) tensor")
        if atom_types.is_floating_point() or atom_types.is_complex():
            raise ValueError(f"{name}: atom_types must hold integers, got {atom_types.dtype}")
        b, n = atom_types.shape
        if not isinstance(positions, Tensor) or tuple(positions.shape) != (b, n, 3):
            got = tuple(positions.shape) if isinstance(positions, Tensor) else positions
            raise ValueError(f"{name}: positions must have shape {(b, n, 3)}, got {got}")
        if atom_mask is not None and tuple(atom_mask.shape) != (b, n):
            raise ValueError(
                f"{name}: atom_mask must have shape {(b, n)}, got {tuple(atom_mask.shape)}"
            )
        expected = {
            "atom_features": (atom_features, self.config.num_atom_features, (b, n)),
            "bond_features": (bond_features, self.config.num_bond_features, (b, n, n)),
        }
        for key, (value, width, lead) in expected.items():
            if width and value is None:
                raise ValueError(
                    f"{name}: the config has num_{key}={width}, so {key} {(*lead, width)} is "
                    "required"
                )
            if not width and value is not None:
                raise ValueError(f"{name}: {key} given but the config has num_{key}=0")
            if value is not None and tuple(value.shape) != (*lead, width):
                raise ValueError(
                    f"{name}: {key} must have shape {(*lead, width)}, got {tuple(value.shape)}"
                )

    def forward(
        self,
        atom_types: Tensor,
        positions: Tensor,
        atom_mask: Tensor | None = None,
        atom_features: Tensor | None = None,
        bond_features: Tensor | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """Atom states and the pooled molecule vector of a padded batch (module docstring)."""
        self._check_inputs(atom_types, positions, atom_mask, atom_features, bond_features)
        mask = atom_types > 0 if atom_mask is None else atom_mask.bool()
        dtype = self.readout.weight.dtype
        keep = mask.unsqueeze(-1).to(dtype)
        h = self.atom_embedding(atom_types.long() * mask)
        if self.atom_projection is not None:
            h = h + self.atom_projection(atom_features.to(dtype))
        h = F.relu(h) * keep

        positions = positions.to(dtype)
        distances = (positions.unsqueeze(2) - positions.unsqueeze(1)).norm(dim=-1)
        edges = gaussian_rbf(distances, self.config.num_rbf, self.config.rbf_max)
        if bond_features is not None:
            edges = torch.cat([edges, bond_features.to(dtype)], dim=-1)
        n = atom_types.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=mask.device)
        pairs = mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye  # i receives from j
        weights = pairs.to(dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1.0)  # mean over neighbours
        gates = self.conv.edge_gates(edges, weights)

        b, _, d = h.shape
        for _ in range(self.config.num_message_steps):
            messages = F.relu(self.conv(h, gates, weights))
            h = self.gru(messages.reshape(b * n, d), h.reshape(b * n, d)).view(b, n, d) * keep
        pooled = F.relu(self.readout(self.set2set(h, mask)))
        output = BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=pooled)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


class MolecularMultiTaskModel(MultiTaskModel):
    """:class:`MultiTaskModel` for molecules: the forward takes the padded molecular inputs of an
    :class:`MPNNModel`-like backbone (``atom_types``, ``positions``, ``atom_mask``, optional
    ``atom_features`` / ``bond_features``) and the labels; heads, losses, ``task_names``,
    ``head_module_names()``, ``shared_parameters()`` and save / ``from_pretrained`` are the
    parent's. Tasks must be sequence-level (classification, multilabel, regression).

    ``AutoModel.from_pretrained`` on a saved model returns the parent class (the config is a
    :class:`MultiTaskConfig`); load with ``MolecularMultiTaskModel.from_pretrained``.
    """

    def __init__(self, config: MultiTaskConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config, backbone=backbone)
        if self.main_input_name != "atom_types":
            raise ValueError(
                f"MolecularMultiTaskModel: the backbone {type(self.backbone).__name__} takes "
                f"{self.main_input_name!r}, not molecules (atom_types, positions); use an "
                "MPNNConfig backbone, or MultiTaskModel for text / image backbones"
            )
        for spec in self.task_specs:
            if spec.type not in SEQUENCE_TASKS:
                raise ValueError(
                    f"MolecularMultiTaskModel: task {spec.name!r} has type {spec.type!r}; "
                    f"molecule-level tasks must be one of {list(SEQUENCE_TASKS)}"
                )
            if spec.label_column in MOLECULE_INPUTS:
                raise ValueError(
                    f"task {spec.name!r}: label_column={spec.label_column!r} is a molecular "
                    f"input name ({list(MOLECULE_INPUTS)})"
                )

    def forward(
        self,
        atom_types: Tensor,
        positions: Tensor,
        atom_mask: Tensor | None = None,
        atom_features: Tensor | None = None,
        bond_features: Tensor | None = None,
        labels: Mapping[str, Tensor] | None = None,
        return_dict: bool | None = None,
        **label_columns: Tensor,
    ) -> MultiTaskOutput | tuple:
        """Run the backbone once and every head; the loss of each task with labels (as
        ``MultiTaskModel.forward``)."""
        task_labels = self._collect_labels(labels, label_columns)
        optional = {"atom_features": atom_features, "bond_features": bond_features}
        outputs = self.backbone(
            atom_types=atom_types,
            positions=positions,
            atom_mask=atom_mask,
            **{k: v for k, v in optional.items() if v is not None},
            return_dict=True,
        )
        pooled = self._pool(outputs, atom_mask)
        logits = {spec.name: self.heads[spec.name](pooled) for spec in self.task_specs}
        task_losses = {
            spec.name: task_loss(spec, logits[spec.name], task_labels[spec.name])
            for spec in self.task_specs
            if spec.name in task_labels
        }
        return self._output(task_losses, logits, return_dict)


AutoConfig.register(MPNNConfig.model_type, MPNNConfig, exist_ok=True)
AutoModel.register(MPNNConfig, MPNNModel, exist_ok=True)

__all__ = [
    "MOLECULE_INPUTS",
    "EdgeNetworkConv",
    "MPNNConfig",
    "MPNNModel",
    "MPNNPreTrainedModel",
    "MolecularMultiTaskModel",
    "Set2Set",
    "gaussian_rbf",
]
