"""A Modbus PLC stand-in for the tests, built on pymodbus 3.16's simulator API.

The register map is JSON. A register entry is a list of 16-bit words, or one typed value that this
script encodes with Python's struct module, independently of the agent's decoder under test; coils
and discrete inputs are lists of booleans:

    {
      "device_id": 1,                      # optional; 0 (the default) answers every unit id
      "holding":  {"100": [17, 2], "200": [65535],
                   "300": {"type": "f32", "order": "CDAB", "value": 1.5}},
      "input":    {"0": [1, 2, 3]},
      "coils":    {"0": [true, false]},
      "discrete": {"8": [true]}
    }

Typed values: `type` is u16, i16, u32, i32, u64, i64, f32 or f64; `order` (default ABCD) names the
value's bytes as they appear on the wire, A being the most significant, generalised to 64 bits as
Telegraf does: CDAB and DCBA reverse the word order, BADC and DCBA swap the bytes in each word.

Strings: {"type": "string", "value": "MIX-7", "length": 4, "order": "BADC", "pad": "space"} puts
the ASCII text two characters per register, padded to `length` registers (default: just enough for
the text) with NUL bytes, or spaces with "pad": "space". `order` is ABCD (each register's high
byte first, the default) or BADC (low byte first). Non-ASCII text is refused here: to send bytes
that are not ASCII, give the words as a list.

Addresses that the map does not define answer with Modbus exception 2 (illegal data address), as a
real PLC does for registers it does not have.

Several slaves on one server (an RTU bus, or a serial gateway): {"devices": [map, map, ...]}, each
map as above with its own device_id of 1 or more. A unit id that none of them has gets no answer at
all, as on a real serial bus where nobody owns that address, so the master times out.

Usage:
    modbus_server.py --map JSON --port PORT [--host 127.0.0.1]     Modbus TCP
    modbus_server.py --map JSON --serial /dev/pts/N [--baudrate B]  Modbus RTU (e.g. a socat pty)
    modbus_server.py --map JSON --port PORT --framer rtu            RTU frames over TCP (a serial gateway)

The line "modbus_server ready" on stdout tells the harness that the server accepts requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys

from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

# pymodbus requires every one of the four blocks to hold at least one entry. An unused block gets one
# invalid register at the top of the address space, so reads of it still answer "illegal address".
_UNUSED_ADDRESS = 65520


_STRUCT_CODES = {
    "u16": ">H", "i16": ">h", "u32": ">I", "i32": ">i", "u64": ">Q", "i64": ">q", "f32": ">f", "f64": ">d",
}


def encode_string(entry: dict, where: str) -> list[int]:
    """Encode an ASCII text into register words, two characters per register."""
    text = entry.get("value")
    if not isinstance(text, str) or not text.isascii():
        raise SystemExit(f"{where}: a string's value must be ASCII text, got {text!r}")
    raw = text.encode("ascii")
    length = entry.get("length", (len(raw) + 1) // 2)
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= 125 or 2 * length < len(raw):
        raise SystemExit(f"{where}: length must be 1..125 registers holding the {len(raw)} characters, got {length!r}")
    pad = {"nul": b"\0", "space": b" "}.get(entry.get("pad", "nul"))
    if pad is None:
        raise SystemExit(f"{where}: pad must be nul or space, got {entry.get('pad')!r}")
    order = entry.get("order", "ABCD")
    if order not in ("ABCD", "BADC"):
        raise SystemExit(f"{where}: a string's order must be ABCD or BADC, got {order!r}")
    raw = raw.ljust(2 * length, pad)
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if order == "BADC":
        words = [word[::-1] for word in words]
    return [int.from_bytes(word, "big") for word in words]


def encode_typed(entry: dict, where: str) -> list[int]:
    """Encode one typed value into register words in the requested byte order."""
    if entry.get("type") == "string":
        return encode_string(entry, where)
    code = _STRUCT_CODES.get(entry.get("type"))
    if code is None:
        raise SystemExit(f"{where}: type must be one of {sorted(_STRUCT_CODES) + ['string']}, got {entry.get('type')!r}")
    order = entry.get("order", "ABCD")
    if order not in ("ABCD", "CDAB", "BADC", "DCBA"):
        raise SystemExit(f"{where}: order must be ABCD, CDAB, BADC or DCBA, got {order!r}")
    value = entry["value"]
    raw = struct.pack(code, value if entry["type"].startswith("f") else int(value))
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if order in ("CDAB", "DCBA"):
        words.reverse()
    if order in ("BADC", "DCBA"):
        words = [word[::-1] for word in words]
    return [int.from_bytes(word, "big") for word in words]


def _register_block(spec: dict[str, list[int] | dict], name: str) -> list[SimData]:
    block = []
    # pymodbus lays the blocks out in list order: keep them in address order.
    for address, words in sorted(spec.items(), key=lambda item: int(item[0])):
        if isinstance(words, dict):
            words = encode_typed(words, f"{name}.{address}")
        if not isinstance(words, list) or not words:
            raise SystemExit(f"{name}.{address}: expected a non-empty list of 16-bit words")
        for word in words:
            if not isinstance(word, int) or isinstance(word, bool) or not 0 <= word <= 0xFFFF:
                raise SystemExit(f"{name}.{address}: {word!r} is not a 16-bit word (0..65535)")
        block.append(SimData(address=int(address), values=words, datatype=DataType.REGISTERS))
    if not block:
        block.append(SimData(address=_UNUSED_ADDRESS, datatype=DataType.INVALID))
    return block


def _bit_block(spec: dict[str, list[bool]], name: str) -> list[SimData]:
    block = []
    for address, bits in spec.items():
        if not isinstance(bits, list) or not bits or not all(isinstance(b, bool) for b in bits):
            raise SystemExit(f"{name}.{address}: expected a non-empty list of booleans")
        block.append(SimData(address=int(address), values=bits, datatype=DataType.BITS))
    if not block:
        # Bit blocks must be DataType.BITS; 16 cleared bits at the top of the space stand in for none.
        block.append(SimData(address=_UNUSED_ADDRESS, values=[False] * 16, datatype=DataType.BITS))
    return block


def build_device(register_map: dict) -> SimDevice:
    """Turn the JSON register map into a pymodbus device with four separate blocks."""
    known = {"device_id", "holding", "input", "coils", "discrete"}
    unknown = set(register_map) - known
    if unknown:
        raise SystemExit(f"unknown keys in the register map: {sorted(unknown)}; known: {sorted(known)}")
    return SimDevice(
        id=int(register_map.get("device_id", 0)),
        simdata=(
            _bit_block(register_map.get("coils", {}), "coils"),
            _bit_block(register_map.get("discrete", {}), "discrete"),
            _register_block(register_map.get("holding", {}), "holding"),
            _register_block(register_map.get("input", {}), "input"),
        ),
    )


def build_devices(register_map: dict) -> tuple[SimDevice | list[SimDevice], bool]:
    """The server's device(s), and whether unknown unit ids go unanswered (several slaves)."""
    if "devices" not in register_map:
        return build_device(register_map), False
    if set(register_map) != {"devices"}:
        raise SystemExit("a map with `devices` holds nothing else; put each slave's tables in its own map")
    maps = register_map["devices"]
    if not isinstance(maps, list) or not maps:
        raise SystemExit("`devices` must be a non-empty list of register maps")
    ids = [int(m.get("device_id", 0)) for m in maps]
    if any(i < 1 for i in ids) or len(set(ids)) != len(ids):
        raise SystemExit(f"every slave in `devices` needs its own device_id of 1 or more, got {ids}")
    return [build_device(m) for m in maps], True


def silent_for_unknown_units(devices: list[SimDevice], unit_offset: int):
    """A packet tracer that drops the answers to unit ids no slave has.

    pymodbus's simulator answers such requests with exception 4 (its `ignore_missing_devices`
    does not cover the simulator's devices); on a serial bus nobody would answer at all.
    `unit_offset` is where the unit id sits in a frame: 0 for RTU, 6 for Modbus TCP.
    """
    known = {device.id for device in devices}

    def trace(sending: bool, packet: bytes) -> bytes:
        if sending and len(packet) > unit_offset and packet[unit_offset] not in known:
            return b""
        return packet

    return trace


async def serve(args: argparse.Namespace) -> None:
    devices, several = build_devices(json.loads(args.map))
    rtu = bool(args.serial) or args.framer == "rtu"
    trace = silent_for_unknown_units(devices, 0 if rtu else 6) if several else None
    if args.serial:
        server = ModbusSerialServer(
            devices, port=args.serial, baudrate=args.baudrate, trace_packet=trace
        )
    else:
        framer = FramerType.RTU if rtu else FramerType.SOCKET
        server = ModbusTcpServer(
            devices, address=(args.host, args.port), framer=framer, trace_packet=trace
        )
    await server.serve_forever(background=True)
    print("modbus_server ready", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--map", required=True, help="register map as JSON text")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--serial", help="serial device for Modbus RTU instead of TCP")
    parser.add_argument("--baudrate", type=int, default=19200)
    parser.add_argument(
        "--framer", choices=("socket", "rtu"), default="socket",
        help="framing over TCP: socket (Modbus TCP, the default) or rtu (RTU over TCP)",
    )
    args = parser.parse_args()
    if not args.serial and not args.port:
        parser.error("give --port for Modbus TCP or --serial for Modbus RTU")
    asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
