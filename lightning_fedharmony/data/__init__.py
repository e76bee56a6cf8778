"""Data: loaders (Mulan ARFF, MEKA .mat, npz, river's yeast), partitioners over clients, Lightning DataModules."""

from lightning_fedharmony.data.datamodule import ClientDataModule, TestDataModule, client_datamodules
from lightning_fedharmony.data.loaders import (
    MultilabelDataset,
    default_data_dir,
    load_arff,
    load_dataset,
    load_mat,
    load_npz,
    load_yeast_from_river,
    read_mulan_xml,
)
from lightning_fedharmony.data.partition import (
    Partition,
    PartitionSummary,
    feature_kmeans,
    iid,
    label_set_dirichlet,
    label_space_masking,
    natural,
    partition_summary,
)

__all__ = [
    "ClientDataModule",
    "MultilabelDataset",
    "Partition",
    "PartitionSummary",
    "TestDataModule",
    "client_datamodules",
    "default_data_dir",
    "feature_kmeans",
    "iid",
    "label_set_dirichlet",
    "label_space_masking",
    "load_arff",
    "load_dataset",
    "load_mat",
    "load_npz",
    "load_yeast_from_river",
    "natural",
    "partition_summary",
    "read_mulan_xml",
]
