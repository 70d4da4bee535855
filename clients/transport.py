"""The ClientApp's side of the distinct-rows transport encoding (fl_sim/learning/transport.py).

The malicious server may send a tensor that is a few distinct rows repeated (the mosaic's imprint block) as those
rows and each row's index, one uint8 array in the tensor's place. `ExpandRowsMod`, the ClientApp's outermost mod,
expands every such array of every ArrayRecord in the message it receives, before any other mod or handler reads
it: in the Message API's `arrays` record and in the legacy records of Flower's SecAgg+ path (`fitins.parameters`,
whose arrays clients/secagg.py later names), so the count and order of arrays stay what both sides expect. Every
mod after it (the faults, `--defense inspect`'s checks, the defenses) and the training see the full tensor, exactly
the one the server armed; the reply, and SecAgg+'s masked vector, have its full shape.
"""
import io

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message

from fl_sim.learning.transport import MAGIC, unpack_rows


def expanded(record: ArrayRecord) -> ArrayRecord:
    """`record` with every distinct-rows encoding replaced by the matrix it holds, in the same key order.

    Parameters
    ----------
    record : ArrayRecord
        A record as received.

    Returns
    -------
    ArrayRecord
        `record` itself when it holds no encoding, else a new record.
    """
    names = [name for name, array in record.items() if is_encoding(array)]
    if not names:
        return record
    out = ArrayRecord()  # item by item, in the record's order (the legacy path's arrays are unnamed)
    for name, array in record.items():
        out[name] = Array(unpack_rows(array.numpy())) if name in names else array
    return out


def is_encoding(array: Array) -> bool:
    """Whether a received Array is a distinct-rows encoding (a 1-D uint8 numpy array starting with its header),
    read from the serialised bytes' own header: the legacy path's Arrays carry no dtype or shape of their own.

    Parameters
    ----------
    array : Array
        An Array as received.

    Returns
    -------
    bool
        True when `unpack_rows` reads it.
    """
    if array.stype != "numpy.ndarray" or (array.dtype and array.dtype != "uint8"):
        return False
    stream = io.BytesIO(array.data[:4096])  # numpy's .npy header, then the array's first bytes
    try:
        version = np.lib.format.read_magic(stream)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(stream) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(stream))
    except ValueError:
        return False
    start = stream.tell()
    return dtype == np.uint8 and len(shape) == 1 and array.data[start:start + len(MAGIC)] == MAGIC


class ExpandRowsMod:
    """A Flower mod: the message's distinct-rows encodings expanded before the rest of the ClientApp runs."""

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        if msg.has_content():
            for key, record in list(msg.content.array_records.items()):
                full = expanded(record)
                if full is not record:
                    msg.content[key] = full
        return call_next(msg, context)
