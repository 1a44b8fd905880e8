"""A Modbus TCP server for the edge agent's integration tests, built on pymodbus 3.16's simulator.

Usage: python modbus_server.py '<register map as JSON>' [port]

The register map is a JSON object:

    {"unit": 1,
     "holding": [{"address": 10, "type": "f32", "order": "CDAB", "value": 123.456}, ...],
     "input":   [{"address": 0, "type": "u16", "value": 4500}, ...]}

`type` is one of u16, i16, u32, i32, f32; `order` (default ABCD) names the bytes of the value as
they appear on the wire, A being the most significant. The encoding is done here, with Python's
struct module, independently of the Rust decoder under test. Addresses not listed answer with an
"illegal data address" exception.

Binds 127.0.0.1 only. Prints `READY <port>` on stdout once the server accepts connections, then
serves until killed.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

STRUCT_CODES = {"u16": ">H", "i16": ">h", "u32": ">I", "i32": ">i", "f32": ">f"}


def encode(entry: dict) -> list[int]:
    """Encodes one value into register words in the requested byte order."""
    code = STRUCT_CODES[entry["type"]]
    value = entry["value"]
    if entry["type"] != "f32":
        value = int(value)
    raw = struct.pack(code, value)
    order = entry.get("order", "ABCD")
    if len(raw) == 2:
        # A 16-bit value has bytes A and B only: the byte-swapped orders swap them.
        raw = raw[::-1] if order in ("BADC", "DCBA") else raw
    else:
        raw = bytes(raw["ABCD".index(letter)] for letter in order)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def blocks(entries: list[dict]) -> list[SimData]:
    """One SimData block of plain registers per value, in address order (pymodbus lays the
    blocks out in list order). pymodbus wants at least one block per table: an empty table gets
    a single invalid register, which answers reads with an exception like an undefined one."""
    if not entries:
        return [SimData(address=0, datatype=DataType.INVALID)]
    return [
        SimData(
            address=entry["address"],
            values=encode(entry),
            datatype=DataType.REGISTERS,
        )
        for entry in sorted(entries, key=lambda e: e["address"])
    ]


async def main() -> None:
    spec = json.loads(sys.argv[1])
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    # Coils and discrete inputs are unused; pymodbus wants at least one block in each list.
    device = SimDevice(
        id=spec.get("unit", 1),
        simdata=(
            [SimData(address=0, values=[False] * 16, datatype=DataType.BITS)],
            [SimData(address=0, values=[False] * 16, datatype=DataType.BITS)],
            blocks(spec.get("holding", [])),
            blocks(spec.get("input", [])),
        ),
    )
    server = ModbusTcpServer(device, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    bound = server.transport.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
