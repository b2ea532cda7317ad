"""Data: a repository -> analysis (inventory, import graph, derived constants) -> packed, split,
weighted repo-level sequences, QA probes and metadata. See build.py for the stages."""

from mlx_ltc.data.build import Corpus, build
from mlx_ltc.data.dataset import Split, load_split
from mlx_ltc.data.formats import markers, tokenizer_hash
from mlx_ltc.data.metadata import DatasetMeta, load_metadata
from mlx_ltc.data.sources import RepoScan, scan

__all__ = [
    "Corpus",
    "DatasetMeta",
    "RepoScan",
    "Split",
    "build",
    "load_metadata",
    "load_split",
    "markers",
    "scan",
    "tokenizer_hash",
]
