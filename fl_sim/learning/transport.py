"""A transport encoding of a matrix that is a few distinct rows repeated: its distinct rows and each row's index.

The mosaic's imprint block (fl_sim/server/mosaic.py) is rows x pixels, and every row of it is one of a few:
every bin of a block points the same way and every client's slice is the same, so the block holds a handful of
distinct rows, repeated thousands of times. The server may send such a tensor as `DistinctRows`: the distinct
rows, bit for bit, and for each row of the matrix the index of its distinct row. The encoding travels as one
1-D uint8 array in the place of the tensor, so a record or a legacy parameter list keeps its count of arrays,
and fl-sim's ClientApp expands it to the full matrix before anything else reads the model (clients/transport.py):
the model a client trains, inspects and replies with is the expanded one, exactly what the server armed, and
its update (and SecAgg+'s vector) has the full shape. It is a transport encoding, not a different model: it is
exact (rows are compared as bytes, so -0.0, NaN payloads and float16 values all come back as they were sent),
and the server uses it only where it is smaller than the plain array.

The array's layout: the 8 bytes `MAGIC`, four little-endian uint64 (rows, columns, distinct rows, the index's
bytes an entry), the rows' numpy dtype as 8 ASCII bytes, then the distinct rows (distinct x columns, C order),
then the index (rows entries, uint16 or uint32).
"""
import numpy as np

MAGIC = b"fl-rows\x01"
_HEADER = len(MAGIC) + 4 * 8 + 8


def pack_rows(matrix: np.ndarray) -> np.ndarray:
    """`matrix` as its distinct rows and each row's index, in one uint8 array (the module's layout).

    Parameters
    ----------
    matrix : np.ndarray
        A 2-D array of a fixed-size numeric dtype.

    Returns
    -------
    np.ndarray
        The encoding, 1-D uint8; `unpack_rows` gives `matrix` back bit for bit.
    """
    if matrix.ndim != 2 or matrix.dtype.kind not in "fiub":
        raise ValueError(f"distinct rows encode a 2-D numeric matrix, not a {matrix.ndim}-D {matrix.dtype} array")
    dtype = matrix.dtype.newbyteorder("<") if matrix.dtype.byteorder == ">" else matrix.dtype
    matrix = np.ascontiguousarray(matrix, dtype=dtype)
    rows, columns = matrix.shape
    first: dict[bytes, int] = {}  # each distinct row (its bytes) -> its index, in order of first appearance
    index = np.empty(rows, dtype=np.uint32)
    for row in range(rows):
        index[row] = first.setdefault(matrix[row].tobytes(), len(first))
    distinct = np.frombuffer(b"".join(first), dtype=np.uint8)
    narrow_index = index.astype("<u2") if len(first) <= 2**16 else index.astype("<u4")
    header = np.array([rows, columns, len(first), narrow_index.itemsize], dtype="<u8").tobytes()
    name = dtype.str.encode("ascii").ljust(8, b" ")
    return np.concatenate([np.frombuffer(MAGIC + header + name, dtype=np.uint8), distinct,
                           np.frombuffer(narrow_index.tobytes(), dtype=np.uint8)])


def is_packed(array: np.ndarray) -> bool:
    """Whether `array` is a `pack_rows` encoding (1-D uint8 starting with `MAGIC`).

    Parameters
    ----------
    array : np.ndarray
        An array as received.

    Returns
    -------
    bool
        True for an encoding `unpack_rows` reads.
    """
    return (array.ndim == 1 and array.dtype == np.uint8 and len(array) >= _HEADER
            and array[:len(MAGIC)].tobytes() == MAGIC)


def unpack_rows(array: np.ndarray) -> np.ndarray:
    """The matrix a `pack_rows` encoding holds, bit for bit; a one-line ValueError for an encoding that is not whole.

    Parameters
    ----------
    array : np.ndarray
        The encoding (`is_packed`).

    Returns
    -------
    np.ndarray
        The rows x columns matrix in the dtype it was packed from.
    """
    if not is_packed(array):
        raise ValueError("not a distinct-rows encoding: no header")
    data = np.ascontiguousarray(array).tobytes()
    rows, columns, count, width = (int(n) for n in np.frombuffer(data, dtype="<u8", count=4, offset=len(MAGIC)))
    try:
        dtype = np.dtype(data[len(MAGIC) + 32:_HEADER].decode("ascii").strip())
    except (TypeError, UnicodeDecodeError) as error:
        raise ValueError(f"distinct-rows encoding: unreadable dtype ({error})") from None
    if width not in (2, 4) or dtype.kind not in "fiub":
        raise ValueError(f"distinct-rows encoding: a {width}-byte index of {dtype} rows is not one it writes")
    start = _HEADER + count * columns * dtype.itemsize
    if len(data) != start + rows * width:
        raise ValueError(f"distinct-rows encoding of {rows} x {columns} {dtype} with {count} distinct rows: "
                         f"{len(data)} bytes, not {start + rows * width}")
    distinct = np.frombuffer(data, dtype=dtype, count=count * columns, offset=_HEADER).reshape(count, columns)
    index = np.frombuffer(data, dtype=f"<u{width}", count=rows, offset=start)
    if rows and int(index.max()) >= count:
        raise ValueError(f"distinct-rows encoding: an index of {int(index.max())} among {count} distinct rows")
    return distinct[index.astype(np.intp)]


def packed_smaller(matrix: np.ndarray) -> np.ndarray | None:
    """`pack_rows(matrix)` where it takes fewer bytes than `matrix` itself, else None (send it plain).

    Parameters
    ----------
    matrix : np.ndarray
        A 2-D numeric matrix.

    Returns
    -------
    np.ndarray or None
        The encoding, or None.
    """
    packed = pack_rows(matrix)
    return packed if packed.nbytes < matrix.nbytes else None
