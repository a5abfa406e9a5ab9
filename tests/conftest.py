"""Test-wide settings: never touch the network; tiny random models are built in the tests."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    """A small real tokenizer that loads instantly (MiniLM's WordPiece), for data-handling tests."""
    from transformers import AutoTokenizer

    from stat_exp.assets import model_path

    return AutoTokenizer.from_pretrained(model_path("minilm_l6"))


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory, tokenizer):
    """A tiny random causal LM saved to a folder and a local text file, for real command-line jobs."""
    from tests.jobs import make_tiny_job

    return make_tiny_job(tmp_path_factory.mktemp("tiny_job"), tokenizer)
