"""What rank 0 tells the other ranks each step, and how they keep up. Plain Python.

Rank 0 owns the scheduler and the block manager; a worker only mirrors what a step needs:
for every entry, its sequence id, how many tokens are already in the cache, the new
tokens' ids, whether it samples, and the changes to its block table. Never the prepared
arrays: every rank prepares its own from the record (engine/step_inputs.prepare), so a
record is a few ints per sequence plus the new token ids.

Both sides keep the block tables of the previous step's sequences only, and apply the
same rule to what they keep, so they never disagree about what a delta is relative to: a
sequence in the previous step sends the blocks its table gained; any other sequence
(new, resumed after preemption, or skipped by a full budget) sends its whole table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanovllm_mlx.engine.core.plan import ScheduledSeq
from nanovllm_mlx.engine.core.sequence import Sequence
from nanovllm_mlx.sampling_params import SamplingParams

MAGIC = 0x4E564C4D  # "NVLM": a record that starts otherwise is a protocol error
STEP, STOP, COPY = 1, 2, 3  # run a forward; exit; copy blocks (forks' copy-on-write)
_PARAMS = SamplingParams(temperature=0.0)  # workers never sample; prepare() needs one


class ProtocolError(RuntimeError):
    """A record that does not decode: the ranks disagree about the protocol."""


@dataclass(slots=True)
class Entry:
    seq_id: int
    start: int  # tokens already in the cache (the first new token's position)
    token_ids: list[int]  # the new tokens, positions [start, start + len)
    samples: bool
    table_from: int  # block_table[table_from:] = blocks
    blocks: list[int]


@dataclass(slots=True)
class Record:
    kind: int
    entries: list[Entry] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # COPY: (source, copy)


def encode(record: Record) -> list[int]:
    if record.kind == COPY:
        return [MAGIC, COPY, len(record.copies), *(b for pair in record.copies for b in pair)]
    out = [MAGIC, record.kind, len(record.entries)]
    for e in record.entries:
        out += [e.seq_id, e.start, len(e.token_ids), int(e.samples), e.table_from, len(e.blocks)]
        out += e.blocks
        out += e.token_ids
    return out


def decode(data: list[int]) -> Record:
    if len(data) < 3 or data[0] != MAGIC:
        raise ProtocolError(f"not a step record (starts {data[:3]})")
    if data[1] == COPY:
        if len(data) != 3 + 2 * data[2]:
            raise ProtocolError(f"a copy record of {len(data)} ints for {data[2]} copies")
        return Record(COPY, copies=list(zip(data[3::2], data[4::2])))
    record, pos = Record(data[1]), 3
    for _ in range(data[2]):
        seq_id, start, n, samples, table_from, n_blocks = data[pos : pos + 6]
        pos += 6
        blocks = data[pos : pos + n_blocks]
        pos += n_blocks
        tokens = data[pos : pos + n]
        pos += n
        record.entries.append(Entry(seq_id, start, tokens, bool(samples), table_from, blocks))
    if pos != len(data):
        raise ProtocolError(f"step record of {len(data)} ints has {len(data) - pos} left over")
    return record


class Sender:
    """Rank 0's side: batches in, records out."""

    def __init__(self) -> None:
        self._tables: dict[int, list[int]] = {}  # seq id -> table as last sent

    def record(self, batch: list[ScheduledSeq]) -> Record:
        entries, tables = [], {}
        for item in batch:
            seq = item.seq
            start = item.start
            table = list(seq.block_table)
            sent = self._tables.get(seq.seq_id)
            keep = len(sent) if sent is not None and table[: len(sent)] == sent else 0
            entries.append(
                Entry(
                    seq.seq_id,
                    start,
                    item.tokens(),
                    item.samples,
                    keep,
                    table[keep:],
                )
            )
            tables[seq.seq_id] = table
        self._tables = tables
        return Record(STEP, entries)


class Mirror:
    """A worker's side: records in, batches over mirror sequences out."""

    def __init__(self) -> None:
        self._seqs: dict[int, Sequence] = {}

    def batch(self, record: Record) -> list[ScheduledSeq]:
        seqs, batch = {}, []
        for e in record.entries:
            seq = self._seqs.get(e.seq_id)
            if seq is None or e.table_from == 0:
                seq = Sequence(e.seq_id, [], _PARAMS)
            if e.table_from > len(seq.block_table):
                raise ProtocolError(
                    f"sequence {e.seq_id}: a delta from block {e.table_from} of a table of "
                    f"{len(seq.block_table)}"
                )
            seq.block_table = seq.block_table[: e.table_from] + e.blocks
            # Only the new tokens are read; cached ones before them are never sent.
            tokens = seq.token_ids[: e.start]
            tokens += [0] * (e.start - len(tokens)) + e.token_ids
            if not e.samples:
                tokens.append(0)  # a chunk that does not reach the end: as on rank 0
            seq.token_ids = tokens
            seqs[e.seq_id] = seq
            batch.append(ScheduledSeq(seq, len(e.token_ids), start=e.start))
        self._seqs = seqs
        return batch
