"""Shared fixtures: the shared data mirror, GPT-2's tokenizer, and tiktoken's offline gpt2."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The shared data mirror (SCRATCHLLM_DATA_DIR, default ../shared/data beside the repo)."""
    path = Path(os.environ.get("SCRATCHLLM_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail(f"shared data not found at {path}: set SCRATCHLLM_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def data() -> Path:
    return data_dir()


@pytest.fixture(scope="session")
def gpt2_files(data: Path) -> tuple[Path, Path]:
    return data / "gpt2-tokenizer" / "encoder.json", data / "gpt2-tokenizer" / "vocab.bpe"


@pytest.fixture(scope="session")
def tiktoken_gpt2(gpt2_files, tmp_path_factory):
    """tiktoken's own gpt2 encoding, loaded offline by seeding its download cache."""
    from bench.common import tiktoken_gpt2

    return tiktoken_gpt2(*gpt2_files, tmp_path_factory.mktemp("tiktoken-cache"))


@pytest.fixture(scope="session")
def gpt2_tok(gpt2_files):
    from scratchllm.tokenizer import Tokenizer

    return Tokenizer.from_gpt2_files(*gpt2_files)


@pytest.fixture(scope="session")
def shakespeare_small(data: Path) -> str:
    return (data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def trained_tok(shakespeare_small):
    """A small BPE trained on tinyshakespeare with the default (GPT-4) pattern."""
    from scratchllm.tokenizer import Tokenizer

    return Tokenizer.train([shakespeare_small], vocab_size=1024, special_tokens=["<|user|>"])


def shared_corpora(data: Path) -> dict[str, str]:
    """Every shared text corpus, decoded as UTF-8 (CRLF kept as is)."""
    paths = [
        data / "tinyshakespeare" / "input.txt",
        data / "the-verdict" / "the-verdict.txt",
        data / "instruction-data" / "instruction-data.json",
        data / "sms-spam" / "SMSSpamCollection",
        data / "instruct-extra" / "gsm8k-train.jsonl",
        *sorted((data / "translation").glob("tatoeba.*")),
        *sorted((data / "gutenberg-books").glob("pg*.txt")),
    ]
    return {p.name: p.read_text(encoding="utf-8") for p in paths}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes threads spin-wait."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pretrain_tiny_base(run_dir: Path, data: Path, context_length: int, n_layer: int,
                       steps: int) -> Path:
    """A tiny char-level GPT pretrained for a few steps on the-verdict: a base to fine-tune."""
    from scratchllm.config import load_config
    from scratchllm.train import PretrainConfig, pretrainer

    os.environ["SCRATCHLLM_DATA_DIR"] = str(data)
    overrides = ["--data.source=the-verdict", "--data.tokenizer=char",
                 f"--model.context_length={context_length}", f"--model.n_layer={n_layer}",
                 "--model.n_head=2", "--model.n_embd=32", "--train.batch_size=2",
                 "--eval.every=0", "--eval.batches=1", "--eval.sample_tokens=0",
                 "--train.threads=1", f"--train.max_steps={steps}"]
    pretrainer(load_config(None, overrides, PretrainConfig), run_dir, progress=False,
               log=lambda *_: None).run()
    return run_dir
