"""How to read a set of shards, as one value the pipelines pass to ``open_shards`` / ``ShardDataModule``."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

#: what an option left unset means
DEFAULTS = {"counts": "auto", "var_names": "index", "gene_join": "same", "obs_filter": None}


@dataclass(frozen=True)
class DataOptions:
    """Where the counts are (``counts``), which names are the genes (``var_names``), how the shards'
    genes are joined (``gene_join``) and which cells are read (``obs_filter``); see ``open_shards``.

    None means "not chosen": :meth:`with_recorded` fills it from what a checkpoint recorded (so
    ``predict`` reads the matrix the model was trained on), :meth:`open_kwargs` from :data:`DEFAULTS`.
    """

    counts: str | None = None
    var_names: str | None = None
    gene_join: str | None = None
    obs_filter: str | None = None

    def with_recorded(self, recorded: dict[str, Any] | None) -> DataOptions:
        """Unset options take the recorded ones (a trained model's ``recipe["data"]["source"]``)."""
        recorded = recorded or {}
        return replace(self, **{f.name: recorded[f.name] for f in fields(self)
                                if getattr(self, f.name) is None and recorded.get(f.name) is not None})

    def open_kwargs(self) -> dict[str, Any]:
        return {f.name: DEFAULTS[f.name] if getattr(self, f.name) is None else getattr(self, f.name)
                for f in fields(self)}


def recorded_source(collection: Any) -> dict[str, Any]:
    """What a trained model records of how its shards were read (``recipe["data"]["source"]``): the
    resolved counts matrix and gene names; prediction reads new cells the same way."""
    return {"counts": collection.counts, "var_names": collection.var_names}


def recorded_covariates(collection: Any) -> dict[str, Any]:
    """What a trained model records of its covariates (``recipe["data"]["covariates"]``): each categorical
    covariate's categories in code order, and the continuous covariates' columns."""
    return {
        "categorical": {key: list(map(str, categories)) for key, categories in
                        zip(collection.categorical_covariate_keys, collection.covariate_categories)},
        "continuous": list(collection.continuous_covariate_keys),
    }


def covariate_options(recorded: dict[str, Any] | None) -> dict[str, Any]:
    """``open_shards`` / ``ShardDataModule`` keyword arguments that read new cells' covariates as a model
    recorded them: the same columns, and each categorical one coded with the model's categories."""
    recorded = recorded or {}
    categorical = dict(recorded.get("categorical") or {})
    return {"categorical_covariate_keys": list(categorical), "covariate_categories": categorical,
            "continuous_covariate_keys": list(recorded.get("continuous") or [])}
