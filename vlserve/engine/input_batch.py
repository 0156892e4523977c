"""The runner's persistent batch: the block tables of the running sequences, kept across steps.

Each running sequence holds a seat (a row) from the step that first schedules it until the scheduler reports it
gone (finished, aborted or preempted: `departed`). A step writes only what changed since the last one: the whole
table of a newly seated sequence, and the blocks a seated one grew by. The step's block tables, KV slots, positions
and context lengths are then numpy gathers over the seats, not per-token Python.
"""

import numpy as np

from vlserve.engine.scheduler import ScheduledSeq


class InputBatch:
    def __init__(self, max_seqs: int, max_blocks: int, block_size: int):
        self.block_size = block_size
        self.tables = np.zeros((max_seqs, max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(max_seqs, dtype=np.int64)  # of each seat's row, filled
        self.seat_of: dict[int, int] = {}  # seq_id -> seat
        self.free_seats = list(range(max_seqs - 1, -1, -1))  # seat 0 first

    def update(self, departed: list[int], scheduled: list[ScheduledSeq]) -> np.ndarray:
        """Applies one step's diff; returns the seat of each scheduled sequence, in order."""
        for seq_id in departed:
            seat = self.seat_of.pop(seq_id, None)
            if seat is not None:
                self.free_seats.append(seat)
        seats = np.empty(len(scheduled), dtype=np.int64)
        for i, item in enumerate(scheduled):
            seq = item.seq
            seat = self.seat_of.get(seq.seq_id)
            if seat is None:
                seat = self.seat_of[seq.seq_id] = self.free_seats.pop()
                self.num_blocks[seat] = 0
            have, table = self.num_blocks[seat], seq.block_table
            if len(table) < have:
                raise RuntimeError(f"sequence {seq.seq_id} lost blocks while seated: its departure was not reported")
            if len(table) > have:  # blocks only grow while seated: a preempted sequence departs first
                self.tables[seat, have:len(table)] = table[have:]
                self.num_blocks[seat] = len(table)
            seats[i] = seat
        return seats

    def step_tables(self, seats: np.ndarray) -> np.ndarray:
        """(B, the step's widest table) block tables of the seats."""
        return self.tables[seats, :int(self.num_blocks[seats].max(initial=0))]

    def slots(self, seats: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(KV slot, position) of every new token of the step, flat: tokens [start, start + length) of each seat."""
        seat_of_token = np.repeat(seats, lengths)
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = np.repeat(starts, lengths) + np.arange(int(lengths.sum())) - first
        size = self.block_size
        return self.tables[seat_of_token, positions // size].astype(np.int64) * size + positions % size, positions
