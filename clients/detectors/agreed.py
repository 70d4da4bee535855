"""The weights a client is sent against the model it agreed to train: `strict-load` and `size`.

An honest client knows its model by the registry's name (`--model`) and its data set's shape, so it knows every
entry's name, shape and dtype, and how many bytes the model is. `strict_load` loads what it was sent strictly
into that model (`load_state_dict(strict=True)`: no entry missing, none extra, every shape the same) and checks
the dtypes, which `load_state_dict` would silently cast; `size` compares the bytes and the entries' element count
of what it was sent with the agreed model's. An honest server sends exactly the agreed model (score 0 and 1.0 in
every honest client-round, benchmarks/detectors.py); the imprint block of `imprint` and `mosaic` adds two layers
and buffers (fl_sim/learning/models/imprint.py). Unlike the inspection's own `architecture` check these say
nothing of the values, only of the form, so a parameter-only attack (trap, qbi) passes both.
"""
import copy

from . import Sent, Verdict

SIZE_MARGIN = 1.01  # what was sent over the agreed model, bytes or entries (honest: exactly 1.0)


def strict_load(sent: Sent) -> Verdict:
    """The entries of `sent.received` that do not load strictly into the agreed model, or differ in dtype.

    Parameters
    ----------
    sent : Sent
        The weights and the agreed model.

    Returns
    -------
    Verdict
        Score: the count of entries missing, extra, of another shape or another dtype; flagged above 0.
    """
    model = copy.deepcopy(sent.agreed)
    expected = model.state_dict()
    try:
        model.load_state_dict(dict(sent.received), strict=True)
        loaded = True
    except RuntimeError:
        loaded = False
    common = set(expected) & set(sent.received)
    wrong = {"missing:": sorted(set(expected) - set(sent.received)),
             "not in the agreed model:": sorted(set(sent.received) - set(expected)),
             "other shapes:": sorted(name for name in common if sent.received[name].shape != expected[name].shape),
             "other dtypes:": sorted(name for name in common if sent.received[name].dtype != expected[name].dtype)}
    count = sum(map(len, wrong.values()))
    if not loaded and not count:  # whatever else load_state_dict refuses
        return Verdict(1, 0, "load_state_dict(strict=True) refuses it")
    detail = "; ".join(f"{label} {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                       for label, names in wrong.items() if names)
    return Verdict(count, 0, detail or "loads strictly into the agreed model")


def size(sent: Sent) -> Verdict:
    """The bytes and elements of `sent.received` over the agreed model's.

    Parameters
    ----------
    sent : Sent
        The weights and the agreed model.

    Returns
    -------
    Verdict
        Score: the larger of the two ratios; flagged above SIZE_MARGIN.
    """
    expected = sent.agreed.state_dict()
    sent_bytes = sum(tensor.numel() * tensor.element_size() for tensor in sent.received.values())
    agreed_bytes = sum(tensor.numel() * tensor.element_size() for tensor in expected.values())
    sent_entries = sum(tensor.numel() for tensor in sent.received.values())
    agreed_entries = sum(tensor.numel() for tensor in expected.values())
    ratio = max(sent_bytes / agreed_bytes, sent_entries / agreed_entries)
    return Verdict(ratio, SIZE_MARGIN, f"{sent_bytes / 2**20:.2f} MiB ({sent_entries} elements) sent for a model of "
                                       f"{agreed_bytes / 2**20:.2f} MiB ({agreed_entries})")
