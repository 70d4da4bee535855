"""fl-sim: a federated-learning simulator whose malicious server attacks every client's update.

As a library, in a Flower app of one's own (docs/audit.md):

- `fl_sim.malicious(strategy, model=Net(), ...)` wraps the ServerApp's strategy in a malicious server
  (fl_sim/server/audit.py);
- `fl_sim.disclose(content, trainloader)` in a ClientApp's train function tells that server what the client
  trained on, for exact scores in a simulation only (clients/disclosure.py).

Both are imported when first used, so `import fl_sim` (and the `fl-sim` command's help) loads neither torch nor
Flower.
"""
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clients.disclosure import disclose
    from fl_sim.server.audit import malicious

__version__ = "0.1.0"
__all__ = ["disclose", "malicious"]


def __getattr__(name: str) -> Any:
    if name == "malicious":
        from fl_sim.server.audit import malicious

        return malicious
    if name == "disclose":
        from clients.disclosure import disclose

        return disclose
    raise AttributeError(f"module 'fl_sim' has no attribute {name!r}")
