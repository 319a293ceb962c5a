"""The smux protocol without I/O: the sans-I/O core of a session.

:class:`SessionCore` is the whole state machine of one session: the stream
table, every rule about what the peer may send, the v1 budget, the v2 windows
and when to send a UPD, the limits and refusals, junk accounting and
keepalive. It owns no socket, thread, lock or clock: a driver feeds it what it
read, asks it what to write and passes the current time in. The blocking
driver (``pysmux/session.py`` with ``reading.py``, ``writing.py`` and
``stream.py``) calls it under its one session lock; the core locks nothing.

================  ============================================================
module            role
================  ============================================================
``stream.py``     :class:`StreamCore`: one stream's half-states (the ``RECV_*``
                  and ``SEND_*`` constants), receive buffer and v2 counters;
                  the driver's stream class derives from it
``state.py``      the session's state, shared by both directions, and its end
``inbound.py``    bytes in, one rule per command, accepting, reading, the budget
``outbound.py``   opening and shutting streams, data frames, the control queue,
                  keepalive
================  ============================================================

**Bytes in.** The core owns the read buffer, as ``asyncio.BufferedProtocol``
does: the driver reads into :meth:`~SessionCore.get_buffer`, reports the count
with :meth:`~SessionCore.buffer_updated`, then calls
:meth:`~SessionCore.handle_frames`. That applies every complete frame and
leaves what the driver must act on:

* ``readable``: streams whose receive buffer went from empty to not empty;
* ``changed``: streams whose state changed otherwise (the peer's FIN, a window
  update), so their waiters must look again;
* ``arrivals``: how many new streams were queued for :meth:`~SessionCore.accept`;
* ``control``: frames to write (refusal FINs);
* ``syn_stalled``: a SYN waits for room in the accept queue; call
  ``handle_frames`` again once the application accepted or ``stall_until``
  passed.

The driver empties ``readable`` and ``changed`` and zeroes ``arrivals`` once it
has acted on them. A frame that breaks the protocol raises ``ProtocolError``;
the driver then ends the session with :meth:`~SessionCore.close`.

**Application calls** change state, queue control frames and say what may
proceed: :meth:`~SessionCore.open_stream`, :meth:`~SessionCore.accept`,
:meth:`~SessionCore.consumed` (after the driver took data from a stream with
its ``_take`` methods; says whether a UPD is owed), :meth:`~SessionCore.shut_recv`,
:meth:`~SessionCore.shut_send`, :meth:`~SessionCore.window` and
:meth:`~SessionCore.send_size` (how much may be sent now),
:meth:`~SessionCore.queue_data`. Control frames (SYN, FIN, UPD, NOP, data
queued by non-blocking sends) wait in ``control`` until the driver takes them
with :meth:`~SessionCore.take_control`; a data frame's header comes from
:meth:`~SessionCore.data_header` once the driver holds the transport.

**Time** is passed in: to ``handle_frames`` (junk rate, accept stall) and to
:meth:`~SessionCore.keepalive`, which queues NOPs, ends a silent session and
says when it next needs to run.

**The end.** :meth:`~SessionCore.close` (the session ended) and
:meth:`~SessionCore.write_failed` (the transport can no longer be written)
reset the streams' states and return the streams whose waiters must wake.
"""

from __future__ import annotations

from .inbound import Inbound
from .outbound import Outbound
from .state import S
from .stream import StreamCore

__all__ = ["SessionCore", "StreamCore"]


class SessionCore(Inbound[S], Outbound[S]):
    """The protocol state machine of one session: its state
    (:class:`~pysmux.core.state.SessionState`), what arrives
    (:class:`~pysmux.core.inbound.Inbound`) and what leaves
    (:class:`~pysmux.core.outbound.Outbound`).

    ``SessionCore(config, is_client=..., now=..., new_stream=...)``:
    ``new_stream(stream_id)`` makes the driver's stream object (a
    :class:`StreamCore` subclass); ``now`` is the driver's monotonic time.
    """

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        state = "closed" if self.closed else "open"
        return f"<SessionCore {role} v{self.version} {state} streams={len(self.streams)}>"
