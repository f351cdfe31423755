"""The association slots of `compacs serve --processes N`, shared by its node processes.

Why shared counters rather than the limits divided by N: the kernel hands each connection
to one of the processes listening on the port (SO_REUSEPORT) by a hash of its addresses,
not by load, so with `max_associations = 64` divided into 2 × 32 a modality could be
refused by one full process while the other sits idle, and a per-AE cap of 16 would become
8 wherever a sender's connections happened to hash to the same process. One table of
`max_associations` slots in shared memory, under one lock, keeps every [limits] count
exact across processes: a slot holds the calling AE title and address of one established
association, and a process counts all slots before it admits one (admission.py).

The table is an anonymous shared mapping made before the processes fork
(multiprocessing's Array without its own lock), so nothing on disk can be left stale: when
one process dies the whole node stops (processes.py), and the table goes with it.
Pending connections (no A-ASSOCIATE-RQ yet) stay counted per process: they cost only the
process that accepted them, which is what that cap protects.
"""

from __future__ import annotations

import ctypes
import os
from multiprocessing.context import BaseContext

AE_BYTES = 16  # an AE title's longest (PS3.5 6.2)
ADDRESS_BYTES = 64  # an IPv6 address as text, with room


class _Slot(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int),  # the process holding it; 0: free
        ("ae", ctypes.c_char * AE_BYTES),
        ("address", ctypes.c_char * ADDRESS_BYTES),
    ]


class SharedSlots:
    """`capacity` association slots that every process of one node sees and changes."""

    def __init__(self, capacity: int, context: BaseContext) -> None:
        self.capacity = capacity
        self.lock = context.Lock()  # a process takes it inside its own admission lock
        self._table = context.Array(_Slot, capacity, lock=False)

    def held(self) -> list[tuple[str, str]]:
        """(AE title, address) of every established association of the node. Call with
        `lock` held."""
        return [
            (slot.ae.decode("latin-1"), slot.address.decode("latin-1"))
            for slot in self._table
            if slot.pid
        ]

    def take(self, ae: str, address: str) -> int:
        """Record one more association; its slot's number, or -1 when all are taken (the
        caller has counted them first, so it is not). Call with `lock` held."""
        for number, slot in enumerate(self._table):
            if not slot.pid:
                slot.pid = os.getpid()
                slot.ae = ae.encode("latin-1", "replace")[:AE_BYTES]
                slot.address = address.encode("latin-1", "replace")[:ADDRESS_BYTES]
                return number
        return -1

    def free(self, number: int) -> None:
        """Give slot `number` back. Call with `lock` held."""
        if 0 <= number < self.capacity:
            self._table[number].pid = 0
