"""A small Mapbox Vector Tile (2.1) reader for the tests, written from the specification: the
protobuf wire format, the layers' keys and values, and the geometry commands decoded into point
lists in tile coordinates (y down, as stored)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

POINT, LINESTRING, POLYGON = 1, 2, 3


@dataclass
class Feature:
    id: int | None
    type: int
    properties: dict
    parts: list[list[tuple[int, int]]]  # points, or rings / lines of points

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        xs = [x for part in self.parts for x, _ in part]
        ys = [y for part in self.parts for _, y in part]
        return min(xs), min(ys), max(xs), max(ys)


@dataclass
class Layer:
    name: str
    extent: int = 4096
    features: list[Feature] = field(default_factory=list)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes):
    """(field number, wire type, value) of a message: ints for varints, bytes for the rest."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def _packed(data: bytes) -> list[int]:
    values, i = [], 0
    while i < len(data):
        value, i = _varint(data, i)
        values.append(value)
    return values


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _value(data: bytes):
    for number, _, value in _fields(data):
        if number == 1:
            return value.decode()
        if number == 2:
            return struct.unpack("<f", value)[0]
        if number == 3:
            return struct.unpack("<d", value)[0]
        if number in (4, 5):
            return value
        if number == 6:
            return _zigzag(value)
        if number == 7:
            return bool(value)
    return None


def _geometry(commands: list[int]) -> list[list[tuple[int, int]]]:
    parts: list[list[tuple[int, int]]] = []
    x = y = i = 0
    while i < len(commands):
        command, count = commands[i] & 7, commands[i] >> 3
        i += 1
        if command == 7:  # ClosePath
            parts[-1].append(parts[-1][0])
            continue
        for _ in range(count):
            x += _zigzag(commands[i])
            y += _zigzag(commands[i + 1])
            i += 2
            if command == 1:  # MoveTo starts a part
                parts.append([])
            parts[-1].append((x, y))
    return parts


def decode(tile: bytes) -> dict[str, Layer]:
    """The tile's layers by name."""
    layers = {}
    for number, _, layer_bytes in _fields(tile):
        if number != 3:
            continue
        keys, values, raw = [], [], []
        layer = Layer(name="")
        for n, _, value in _fields(layer_bytes):
            if n == 1:
                layer.name = value.decode()
            elif n == 2:
                raw.append(value)
            elif n == 3:
                keys.append(value.decode())
            elif n == 4:
                values.append(_value(value))
            elif n == 5:
                layer.extent = value
        for feature_bytes in raw:
            fid, kind, tags, geometry = None, 0, [], []
            for n, _, value in _fields(feature_bytes):
                if n == 1:
                    fid = value
                elif n == 2:
                    tags = _packed(value)
                elif n == 3:
                    kind = value
                elif n == 4:
                    geometry = _packed(value)
            properties = {keys[k]: values[v] for k, v in zip(tags[::2], tags[1::2], strict=True)}
            layer.features.append(Feature(fid, kind, properties, _geometry(geometry)))
        layers[layer.name] = layer
    return layers
