"""Reader for dlib's serialization format, enough to load a `dnn` network file such as
`dlib_face_recognition_resnet_model_v1.dat` (torch-free: bytes in, numpy arrays out).

The format, as dlib's `serialize.h`, `dnn/tensor.h`, `dnn/core.h` and `dnn/layers.h` write it:

- an integer is a control byte (bit 7: negative, low 4 bits: how many bytes follow) and that many
  bytes, little-endian;
- a float is two integers, mantissa (int64) and exponent (int16): value = mantissa * 2**exponent;
- a string is its length (integer) and its bytes; a bool is the ASCII byte '0' or '1';
- a tensor is version 2, then num_samples, k, nr, nc (integers), then the values as raw
  little-endian float32; an alias tensor (a view into a layer's `params`) is version 1 and its shape;
- a network is written from the loss down: the loss layer's version and details, then every wrapper
  layer's version (add_layer 1-3, add_tag_layer/add_skip_layer 1), then the input layer, then, from
  the input upwards, each computational layer's details (its name string first) followed by the
  bookkeeping of its add_layer (bools and usually-empty tensors). Tag and skip layers write nothing
  of their own, so the file holds a flat list of layers in forward order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DlibFormatError(ValueError):
    pass


_NAME = re.compile(rb"[a-z][a-z0-9_]*\Z")


@dataclass
class DlibLayer:
    """One computational layer: its serialized name (e.g. `con_4`) and the fields read from it."""

    name: str
    fields: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """`con`, `affine`, `relu`, `max_pool`, `avg_pool`, `add_prev`, `fc`, ... (version suffix dropped)."""
        return re.sub(r"_\d*$", "", self.name)


class Reader:
    def __init__(self, data: bytes, where: str = "<bytes>") -> None:
        self.data, self.pos, self.where = data, 0, where

    def fail(self, problem: str) -> DlibFormatError:
        return DlibFormatError(f"{self.where}: {problem} at byte {self.pos}")

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("unexpected end of file")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def int(self) -> int:
        ctrl = self.byte()
        size = ctrl & 0x0F
        if size > 8 or ctrl & 0x70:
            raise self.fail(f"bad integer control byte 0x{ctrl:02x}")
        raw = self.take(size)
        value = int.from_bytes(raw, "little") if size else 0
        return -value if ctrl & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        # dlib marks non-finite values with reserved exponents (float_details: 32000 and up)
        if exponent >= 32000:
            raise self.fail("non-finite float in the file")
        return float(mantissa) * 2.0**exponent

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"unexpected end of file (wanted {n} bytes)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self) -> str:
        n = self.int()
        if not 0 <= n < 1 << 20:
            raise self.fail(f"bad string length {n}")
        return self.take(n).decode("latin-1")

    def bool(self) -> bool:
        ch = self.byte()
        if ch not in (0x30, 0x31):
            raise self.fail(f"bad bool byte 0x{ch:02x}")
        return ch == 0x31

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise self.fail(f"unsupported tensor version {version}")
        shape = tuple(self.int() for _ in range(4))  # (num_samples, k, nr, nc)
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), dtype="<f4").reshape(shape).copy()

    def alias_tensor(self) -> tuple[int, int, int, int]:
        version = self.int()
        if version != 1:
            raise self.fail(f"unsupported alias_tensor version {version}")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]

    def peek_name(self) -> str | None:
        """The string at the cursor when it looks like a layer name, else None (cursor unchanged)."""
        start = self.pos
        try:
            n = self.int()
            if not 2 <= n <= 64 or self.pos + n > len(self.data):
                return None
            raw = self.data[self.pos : self.pos + n]
            return raw.decode() if _NAME.match(raw) else None
        except DlibFormatError:
            return None
        finally:
            self.pos = start


def _read_layer(r: Reader, name: str) -> DlibLayer:
    """Details of one layer; `name` has just been read."""
    layer = DlibLayer(name)
    f = layer.fields
    kind = layer.kind
    if name == "con_4" or name == "con_5":
        f["params"] = r.tensor()
        f["num_filters"], f["nr"], f["nc"] = r.int(), r.int(), r.int()
        f["stride_y"], f["stride_x"], f["padding_y"], f["padding_x"] = r.int(), r.int(), r.int(), r.int()
        f["filters"], f["biases"] = r.alias_tensor(), r.alias_tensor()
        f["multipliers"] = [r.float() for _ in range(4)]  # learning-rate / weight-decay multipliers
        if name == "con_5":
            f["use_bias"] = r.bool()
    elif name == "affine_":
        f["params"] = r.tensor()
        f["gamma"], f["beta"] = r.alias_tensor(), r.alias_tensor()
        f["mode"] = r.int()  # dlib's layer_mode: 0 per channel (CONV_MODE), 1 per unit (FC_MODE)
    elif name in ("max_pool_2", "avg_pool_2"):
        f["nr"], f["nc"], f["stride_y"], f["stride_x"] = r.int(), r.int(), r.int(), r.int()
        f["padding_y"], f["padding_x"] = r.int(), r.int()
    elif name == "fc_2":
        f["num_outputs"], f["num_inputs"] = r.int(), r.int()
        f["params"] = r.tensor()
        f["weights"], f["biases"] = r.alias_tensor(), r.alias_tensor()
        f["bias_mode"] = r.int()  # 0: with bias, 1: no bias
        f["multipliers"] = [r.float() for _ in range(4)]
    elif kind in ("relu", "add_prev"):
        pass  # no state of their own (the tag an add_prev reads is a template argument)
    else:
        raise r.fail(f"unsupported dlib layer {name!r}")
    return layer


def _skip_bookkeeping(r: Reader) -> None:
    """add_layer's own state after a layer's details: bools, then tensors (x_grad, cached output...)
    and, after the layer on the input, the sample expansion factor (an integer)."""
    while r.pos < len(r.data) and r.data[r.pos] in (0x30, 0x31):
        r.bool()
    while r.pos < len(r.data) and r.peek_name() is None:
        if r.data[r.pos : r.pos + 2] == b"\x01\x02":  # tensor version 2
            r.tensor()
        else:
            r.int()


@dataclass
class DlibNet:
    """A dnn file: loss and input details, and the computational layers from input to output."""

    loss: dict
    input: dict
    layers: list[DlibLayer]

    def kinds(self) -> list[str]:
        return [lay.kind for lay in self.layers]


def read_dlib_net(path: str | Path) -> DlibNet:
    """Parse a dlib `loss_metric` network with an `input_rgb_image_sized` input."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DlibFormatError(f"{p}: cannot read ({e.strerror or e})") from None
    r = Reader(data, str(p))
    version = r.int()
    if version != 1:
        raise r.fail(f"not a dlib network file (loss layer version {version})")
    loss_name = r.string()
    if not loss_name.startswith("loss_metric"):
        raise r.fail(f"expected a loss_metric network, found {loss_name!r}")
    loss = {"name": loss_name, "margin": r.float(), "distance_threshold": r.float()}
    # the wrappers' version integers, down to the input layer's name
    while r.peek_name() is None:
        v = r.int()
        if not 1 <= v <= 3:
            raise r.fail(f"unexpected layer version {v} before the input layer")
    input_name = r.string()
    if input_name != "input_rgb_image_sized":
        raise r.fail(f"expected input_rgb_image_sized, found {input_name!r}")
    inp = {"avg_red": r.float(), "avg_green": r.float(), "avg_blue": r.float(), "nr": r.int(), "nc": r.int()}
    layers = []
    while r.pos < len(data):
        name = r.string()
        layers.append(_read_layer(r, name))
        _skip_bookkeeping(r)
    return DlibNet(loss, inp, layers)
