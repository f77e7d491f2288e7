"""Loading a hub dataset split with an error that says what to do when it is not there."""

from __future__ import annotations

from typing import Any

import datasets


def load_hub_split(path: str, name: str, split: str, *, hub_id: str, layout: str) -> Any:
    """``datasets.load_dataset(path, name=name, split=split)``. A missing dataset, config or
    split raises FileNotFoundError saying what is missing, where to get it and the layout
    expected, instead of datasets' bare message."""
    try:
        return datasets.load_dataset(path, name=name, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise FileNotFoundError(
            f"{hub_id}: could not load config {name!r}, split {split!r} from {path!r} ({err}). "
            f"Get the data with network access by passing the hub id {hub_id!r}, or download it "
            f"once with `hf download {hub_id} --repo-type dataset --local-dir DIR` and pass DIR. "
            f"Expected layout: {layout}."
        ) from err
