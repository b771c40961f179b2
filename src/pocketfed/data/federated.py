"""A federated dataset: device ids, and each device's tokenized train/test split on demand.

Parsing the raw text of every device is cheap (~0.1 s for all 1,319 Shakespeare roles); tokens
are made per device when first asked for, so building 1,000+ devices takes seconds.

Split: a device's pieces of text (speeches, paragraphs) are kept in order and the last
`test_fraction` of them are its test split, so the test split holds its later lines.
Blocks: each split is one token stream (pieces joined by EOS) cut into rows of `seq_len`; the
last partial row is padded and masked out of the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from pocketfed.config import DataConfig
from pocketfed.data import shakespeare, textdir
from pocketfed.errors import UserError

DATASETS = ("shakespeare", "textdir")


@dataclass(frozen=True)
class Blocks:
    """Token rows of one split. input_ids, mask: [n_rows, seq_len] (int64, bool)."""

    input_ids: torch.Tensor
    mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class DeviceData:
    device_id: str
    train: Blocks
    test: Blocks


def split_pieces(pieces: list[str], test_fraction: float) -> tuple[list[str], list[str]]:
    """Earlier pieces train, the last ceil(n * test_fraction) pieces test (at least one each)."""
    if len(pieces) < 2:
        return pieces, []
    n_test = min(len(pieces) - 1, max(1, math.ceil(len(pieces) * test_fraction)))
    return pieces[:-n_test], pieces[-n_test:]


def to_blocks(token_ids: list[int], seq_len: int, pad_id: int) -> Blocks:
    n_rows = math.ceil(len(token_ids) / seq_len) if len(token_ids) >= 2 else 0
    ids = torch.full((n_rows, seq_len), pad_id, dtype=torch.int64)
    mask = torch.zeros((n_rows, seq_len), dtype=torch.bool)
    if n_rows:
        flat = torch.tensor(token_ids, dtype=torch.int64)
        ids.view(-1)[: len(flat)] = flat
        mask.view(-1)[: len(flat)] = True
    return Blocks(ids, mask)


class FederatedDataset:
    """Devices and their data. `pieces(id)` is raw text; `device(id)` is tokenized (cached)."""

    def __init__(self, name: str, raw: dict[str, list[str]], tokenizer, cfg: DataConfig):
        self.name = name
        self._raw = raw
        self._tok = tokenizer
        self._cfg = cfg
        self._eos = tokenizer.eos_token_id
        self.device_ids: list[str] = self._filter(sorted(raw))
        if not self.device_ids:
            raise UserError(
                f"dataset {name!r} has no device with at least {cfg.min_train_tokens} training tokens "
                "(lower data.min_train_tokens)"
            )
        self.device = lru_cache(maxsize=4096)(self._device)

    def _join(self, pieces: list[str]) -> str:
        """One string per split, each piece ended by the EOS token's text (tokenized as EOS)."""
        eos = self._tok.eos_token
        return "".join(p + eos for p in pieces)

    def _encode(self, pieces: list[str]) -> list[int]:
        return self._tok(self._join(pieces), add_special_tokens=False)["input_ids"] if pieces else []

    def _filter(self, ids: list[str]) -> list[str]:
        counts = self.train_token_counts(ids)
        return [d for d, n in zip(ids, counts) if n >= self._cfg.min_train_tokens]

    def train_token_counts(self, ids: list[str]) -> list[int]:
        """Training tokens per device (as `device()` makes them), in one batched tokenizer call."""
        texts = [self._join(split_pieces(self._raw[d], self._cfg.test_fraction)[0]) for d in ids]
        return [len(x) for x in self._tok(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def pieces(self, device_id: str) -> list[str]:
        return self._raw[device_id]

    def _device(self, device_id: str) -> DeviceData:
        if device_id not in self._raw:
            raise KeyError(f"unknown device {device_id!r}")
        train, test = split_pieces(self._raw[device_id], self._cfg.test_fraction)
        pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else self._eos
        return DeviceData(
            device_id,
            to_blocks(self._encode(train), self._cfg.seq_len, pad),
            to_blocks(self._encode(test), self._cfg.seq_len, pad),
        )

    def device_of_line(self, line: str) -> str | None:
        """The device whose text holds `line` (first match), e.g. for checking the partition."""
        for d, pieces in self._raw.items():
            if any(line in p for p in pieces):
                return d
        return None


def load_dataset(cfg: DataConfig, tokenizer) -> FederatedDataset:
    if cfg.dataset == "shakespeare":
        raw = shakespeare.load_roles()
    elif cfg.dataset == "textdir":
        if not cfg.path:
            raise UserError("dataset 'textdir' needs data.path: a folder of .txt/.md/.jsonl files")
        raw = {d: textdir.read_device(p) for d, p in textdir.list_devices(Path(cfg.path).expanduser()).items()}
    else:
        raise UserError(f"unknown dataset {cfg.dataset!r}; valid datasets are: {', '.join(DATASETS)}")
    return FederatedDataset(cfg.dataset, raw, tokenizer, cfg)
