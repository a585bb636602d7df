"""Packing tokenized documents into fixed-length rows with document boundaries kept.

Documents (each followed by EOS when the tokenizer has one) are concatenated into one token
stream and cut into rows of ``seq_len`` tokens. A batch carries, besides ``input_ids``:
``positions`` restarting at 0 at every document start, ``cu_seqlens`` (int32, cumulative
lengths of the document segments over the flattened batch, as varlen attention takes them, so
no token attends across a document boundary) and ``labels`` (= input_ids, shifted inside the
model as transformers does, with -100 at each document's first token so the last token of one
document is not asked to predict the next document).
"""
from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100


def pack_documents(token_lists, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates documents into (stream int32, doc_starts int64)."""
    lens = np.array([len(t) + (eos_id is not None) for t in token_lists], dtype=np.int64)
    starts = np.zeros(len(lens), dtype=np.int64)
    if len(lens):
        np.cumsum(lens[:-1], out=starts[1:])
    stream = np.empty(int(lens.sum()), dtype=np.int32)
    for s, t, n in zip(starts, token_lists, lens):
        stream[s:s + len(t)] = t
        if eos_id is not None:
            stream[s + n - 1] = eos_id
    return stream, starts


class PackedDataset:
    """Rows of ``seq_len`` tokens cut from a packed stream (the tail that does not fill a row is dropped)."""

    def __init__(self, stream: np.ndarray, doc_starts: np.ndarray, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len: expected at least 2, got {seq_len}")
        self.stream = np.asarray(stream)
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self.seq_len = int(seq_len)

    def __len__(self) -> int:
        return len(self.stream) // self.seq_len

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def row_segments(self, i: int) -> list[int]:
        """Document segment lengths of row ``i`` (summing to seq_len)."""
        a, b = i * self.seq_len, (i + 1) * self.seq_len
        lo, hi = np.searchsorted(self.doc_starts, [a + 1, b])
        cuts = [0] + [int(x - a) for x in self.doc_starts[lo:hi]] + [self.seq_len]
        return [cuts[k + 1] - cuts[k] for k in range(len(cuts) - 1)]

    def batch(self, indices) -> dict:
        """input_ids, labels, positions (B, S) int64 and cu_seqlens (num_segments + 1,) int32."""
        S = self.seq_len
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("batch: expected at least one row index, got none")
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"batch: row index {bad[0]} out of range for {len(self)} rows of {S} tokens")
        ids = np.stack([self.stream[i * S:(i + 1) * S] for i in indices]).astype(np.int64)
        labels = ids.copy()
        pos = np.empty_like(ids)
        cu = [0]
        max_len = 0
        for r, i in enumerate(indices):
            off = 0
            for n in self.row_segments(int(i)):
                pos[r, off:off + n] = np.arange(n)
                if off > 0:
                    labels[r, off] = IGNORE_INDEX
                off += n
                cu.append(cu[-1] + n)
                max_len = max(max_len, n)
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "positions": torch.from_numpy(pos), "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
                "max_seqlen": max_len}
