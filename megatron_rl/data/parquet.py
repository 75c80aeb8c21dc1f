"""Parquet files read one row group at a time, never whole.

Training sets (DeepCoder's tests run to megabytes per problem) can exceed host memory, so
``ParquetSource`` only ever holds the footers of its files, a few decoded row groups in a
small LRU, and per-row-group row counts. Rows are addressed by ``uid``: the row's position
over all files in order (file order, then row order), stable for a given file list.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_rl.errors import DataError


@dataclass(frozen=True)
class RowRef:
    """Where a uid lives: file index, row group, row within the group, row within the file."""

    file: int
    group: int
    row_in_group: int
    row_in_file: int


@dataclass(frozen=True)
class RowGroup:
    """One decoded row group: its rows as Python dicts (one key per column read)."""

    file: int
    group: int
    first_uid: int
    first_row_in_file: int
    rows: list[dict[str, Any]]


class ParquetSource:
    """Files checked at construction (exist, parquet, rows, required columns); rows read lazily.

    ``required`` columns must be in every file; ``optional`` columns are read where present.
    """

    def __init__(self, files: Sequence[str], required: Sequence[str],
                 optional: Sequence[str] = (), cache_size: int = 4) -> None:
        if not files:
            raise DataError("No data files were given (the file list is empty). Set "
                            "`data.train_files` to one or more parquet files.")
        self.paths = [str(f) for f in files]
        self._files = [_open(p) for p in self.paths]
        self.columns = [_columns(p, f, required, optional) for p, f in zip(self.paths, self._files)]
        # starts[k][g]: uid of the first row of group g of file k; file_starts[k]: of file k.
        self._group_starts: list[list[int]] = []
        self._file_starts: list[int] = []
        total = 0
        for f in self._files:
            self._file_starts.append(total)
            starts = []
            for g in range(f.metadata.num_row_groups):
                starts.append(total)
                total += f.metadata.row_group(g).num_rows
            self._group_starts.append(starts)
        self.num_rows = total
        self._cache: OrderedDict[tuple[int, int], RowGroup] = OrderedDict()
        self._cache_size = max(1, cache_size)

    def locate(self, uid: int) -> RowRef:
        """The file, row group and offsets of row ``uid`` (0 <= uid < num_rows)."""
        if not 0 <= uid < self.num_rows:
            raise IndexError(f"row {uid} out of range [0, {self.num_rows})")
        k = bisect.bisect_right(self._file_starts, uid) - 1
        # the last group starting at or before uid holds it (never an empty group: an empty
        # group starts where the next one does)
        g = bisect.bisect_right(self._group_starts[k], uid) - 1
        return RowRef(k, g, uid - self._group_starts[k][g], uid - self._file_starts[k])

    def row_groups(self) -> Iterator[RowGroup]:
        """Every row group in uid order, each read once and not cached (for index passes)."""
        for k, f in enumerate(self._files):
            for g in range(f.metadata.num_row_groups):
                yield self._read(k, g)

    def group(self, file: int, group: int) -> RowGroup:
        """Row group ``group`` of file ``file``, from a small LRU of decoded groups."""
        key = (file, group)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        rg = self._read(file, group)
        self._cache[key] = rg
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return rg

    def row(self, uid: int) -> tuple[RowRef, dict[str, Any]]:
        """Row ``uid`` as a dict of its columns, with its address (for error messages)."""
        ref = self.locate(uid)
        return ref, self.group(ref.file, ref.group).rows[ref.row_in_group]

    def _read(self, file: int, group: int) -> RowGroup:
        try:
            table = self._files[file].read_row_group(group, columns=self.columns[file])
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.paths[file]}: row group {group} cannot be read ({e}). The "
                            "file is damaged or changed since it was opened; rewrite it.") from e
        first = self._group_starts[file][group]
        return RowGroup(file, group, first, first - self._file_starts[file], table.to_pylist())


def _open(path: str) -> pq.ParquetFile:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file. Check the path in `data.train_files` (relative "
                        f"paths are taken from the working directory, {os.getcwd()}).")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a parquet file. List the parquet files "
                        "themselves in `data.train_files`.")
    try:
        f = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}). Convert the data to "
                        "parquet first, e.g. `megatron-rl data deepscaler IN.json OUT.parquet`.") from e
    if f.metadata.num_rows == 0:
        raise DataError(f"{path}: the file has 0 rows. Remove it from `data.train_files` or "
                        "regenerate it.")
    return f


def _columns(path: str, f: pq.ParquetFile, required: Sequence[str],
             optional: Sequence[str]) -> list[str]:
    present = list(f.schema_arrow.names)
    missing = [c for c in required if c not in present]
    if missing:
        raise DataError(f"{path}: column(s) {', '.join(f'`{c}`' for c in missing)} missing; "
                        f"the file has {', '.join(f'`{c}`' for c in present)}. Rename the "
                        "column in the file, or point the `data.*_key` setting at the right one.")
    return list(required) + [c for c in optional if c in present and c not in required]


@dataclass(frozen=True)
class RowIndex:
    """The rows a dataset keeps: uids and token counts (int arrays), plus how many were dropped.

    This is all a dataset holds per row (12 bytes), so memory never grows with text size.
    """

    uids: Any  # np.ndarray[int64], increasing
    lengths: Any  # np.ndarray[int32], tokens of each kept row
    num_dropped: int


def build_index(source: ParquetSource, measure: Callable[[RowGroup], list[int]],
                max_len: int, limit_name: str) -> RowIndex:
    """Measure every row (one row group at a time) and keep those of at most ``max_len`` tokens.

    ``measure`` validates a group's rows (raising DataError) and returns their token counts.
    ``limit_name`` names the setting in the error raised when no row fits.
    """
    import numpy as np

    uids: list[Any] = []
    lengths: list[Any] = []
    for rg in source.row_groups():
        n = np.asarray(measure(rg), dtype=np.int64)
        keep = n <= max_len
        uids.append(rg.first_uid + np.flatnonzero(keep))
        lengths.append(n[keep].astype(np.int32))
    all_uids = np.concatenate(uids) if uids else np.zeros(0, np.int64)
    if len(all_uids) == 0:
        raise DataError(f"all {source.num_rows} rows of {', '.join(source.paths)} are longer than "
                        f"{limit_name}={max_len} tokens, so nothing is left to train on. Raise "
                        f"{limit_name} or use shorter data.")
    return RowIndex(all_uids.astype(np.int64), np.concatenate(lengths),
                    source.num_rows - len(all_uids))


def check_index(i: int, n: int) -> int:
    """``i`` as a position in [0, n) (negatives count from the end, as for lists)."""
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for a dataset of {n} rows")
    return i % n


def get_many(dataset: Any, indices: Sequence[int]) -> list[Any]:
    """``[dataset[i] for i in indices]`` for a dataset with an ``index`` (a RowIndex), visiting
    rows in uid order so each row group is decoded once per call however small the LRU."""
    order = sorted(range(len(indices)), key=lambda j: int(dataset.index.uids[indices[j]]))
    out: list[Any] = [None] * len(indices)
    for j in order:
        out[j] = dataset[indices[j]]
    return out
