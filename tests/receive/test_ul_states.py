"""The acceptor's PS3.8 state table (dicom_ai/dimse/ul_states.py), and that the
connection loop goes through it (driven over a socket pair, no listening port)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import product

import pytest
from pydicom.uid import CTImageStorage

from dicom_ai.dimse.acceptor import Acceptor, Association, CStoreRequest, Rejection
from dicom_ai.dimse.pdv import AbortReason, PDUType
from dicom_ai.dimse.service import Refusal
from dicom_ai.dimse.ul_states import (
    TRANSITIONS,
    Action,
    Event,
    State,
    Transition,
    event_for_pdu,
    transition,
)
from tests.raw_dicom import _associate_rq, read_pdu

S, E, A = State, Event, Action
ABORTS = {A.AA_1, A.AA_8}
PDU_EVENTS = [event_for_pdu(t) for t in PDUType]
# Events the peer can cause in a state where the acceptor reads; local events (Evt7, 8,
# 14) follow only from the acceptor's own actions.
PEER_EVENTS = [*PDU_EVENTS, E.INVALID_PDU, E.TRANSPORT_CLOSED]
READING_STATES = [S.STA2, S.STA6, S.STA13]


def test_pdu_types_map_to_the_standards_events() -> None:
    assert [event.value for event in PDU_EVENTS] == [
        "Evt6",
        "Evt3",
        "Evt4",
        "Evt10",
        "Evt12",
        "Evt13",
        "Evt16",
    ]
    for unknown in (0x00, 0x08, 0x0A, 0xFF):
        assert event_for_pdu(unknown) is E.INVALID_PDU


def test_an_association_from_request_to_release() -> None:
    state, actions = S.STA1, []
    for event in [
        E.TRANSPORT_CONNECTED,
        E.A_ASSOCIATE_RQ_RECEIVED,
        E.A_ASSOCIATE_ACCEPT,
        E.P_DATA_TF_RECEIVED,
        E.P_DATA_TF_RECEIVED,
        E.A_RELEASE_RQ_RECEIVED,
        E.A_RELEASE_RESPONSE,
        E.TRANSPORT_CLOSED,
    ]:
        step = transition(state, event)
        actions.append(step.action)
        state = step.next_state
    assert actions == [A.AE_5, A.AE_6, A.AE_7, A.DT_2, A.DT_2, A.AR_2, A.AR_4, A.AR_5]
    assert state is S.STA1


def test_a_rejected_request_closes() -> None:
    assert transition(S.STA3, E.A_ASSOCIATE_REJECT) == Transition(A.AE_8, S.STA1)


@pytest.mark.parametrize(("state", "event"), list(product(READING_STATES, PEER_EVENTS)))
def test_every_peer_event_in_every_reading_state_has_an_answer(state: State, event: Event) -> None:
    step = transition(state, event)
    if state is S.STA13:
        # Waiting for the close after release: PDUs are not even parsed (AA-6).
        assert event is not E.TRANSPORT_CLOSED or step == Transition(A.AR_5, S.STA1)
        return
    expected_ok = {
        S.STA2: {E.A_ASSOCIATE_RQ_RECEIVED: A.AE_6, E.TRANSPORT_CLOSED: A.AA_5},
        S.STA6: {
            E.P_DATA_TF_RECEIVED: A.DT_2,
            E.A_RELEASE_RQ_RECEIVED: A.AR_2,
            E.A_ABORT_RECEIVED: A.AA_3,
            E.TRANSPORT_CLOSED: A.AA_4,
        },
    }[state]
    if event in expected_ok:
        assert step.action is expected_ok[event]
        assert step.action not in ABORTS
    else:
        # Anything else is a protocol error: A-ABORT, then the connection closes.
        assert step.action in ABORTS and step.next_state is S.STA1
        if event is E.INVALID_PDU:
            assert step.abort_reason is None  # the reason found in the PDU
        else:
            assert step.abort_reason is AbortReason.UNEXPECTED_PDU


@pytest.mark.parametrize(
    ("state", "event", "action", "reason"),
    [
        (S.STA2, E.ARTIM_EXPIRED, A.AA_2, None),  # closed without a word
        (S.STA13, E.ARTIM_EXPIRED, A.AA_2, None),
        (S.STA6, E.A_ABORT_REQUEST, A.AA_1, AbortReason.REASON_NOT_SPECIFIED),
    ],
)
def test_timers(state: State, event: Event, action: Action, reason: AbortReason | None) -> None:
    step = transition(state, event)
    assert (step.action, step.next_state, step.abort_reason) == (action, S.STA1, reason)


@pytest.mark.parametrize(("state", "event"), list(product(State, Event)))
def test_pairs_outside_the_table_are_aa8_unexpected_pdu(state: State, event: Event) -> None:
    if (state, event) in TRANSITIONS:
        return
    assert transition(state, event) == Transition(A.AA_8, S.STA1, AbortReason.UNEXPECTED_PDU)


def test_the_table_is_closed_and_aborts_end_the_connection() -> None:
    reached = {step.next_state for step in TRANSITIONS.values()}
    assert reached <= {state for state, _ in TRANSITIONS}
    for step in TRANSITIONS.values():
        if step.action in ABORTS:
            assert step.next_state is S.STA1


# -- the connection loop consults the table ---------------------------------------------------


class _Service:
    def __init__(self) -> None:
        self.ended: list[Association] = []

    def admit(self, association: Association) -> Rejection | None:
        return None

    def c_echo(self, association: Association) -> int:
        return 0

    def c_store(self, request: CStoreRequest) -> int:
        return 0

    def association_ended(self, association: Association) -> None:
        self.ended.append(association)

    def association_judged(self, association: Association, refusal: Refusal | None) -> None:
        pass


@contextmanager
def _connected(network_timeout: float = 5.0) -> Iterator[socket.socket]:
    """A socket whose other end runs one acceptor connection on a thread."""
    ours, theirs = socket.socketpair()
    node = Acceptor(_Service(), [], network_timeout=network_timeout, acse_timeout=5.0)
    thread = threading.Thread(
        target=node._connection, args=(theirs, "127.0.0.1", None), daemon=True
    )
    thread.start()
    ours.settimeout(5)
    try:
        yield ours
    finally:
        ours.close()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    with _connected() as sock:
        yield sock


def _associated(sock: socket.socket) -> None:
    sock.sendall(_associate_rq("DICOM_AI", "RAWPEER", CTImageStorage, "1.2.840.10008.1.2.1"))
    assert read_pdu(sock)[0] == PDUType.A_ASSOCIATE_AC


def test_release_goes_through_the_table(peer: socket.socket) -> None:
    _associated(peer)
    peer.sendall(bytes([PDUType.A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    assert read_pdu(peer)[0] == PDUType.A_RELEASE_RP


def test_a_changed_table_changes_the_connection(
    peer: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With A-RELEASE-RQ in Sta6 made illegal, the node aborts instead of releasing: the
    loop has no transitions of its own."""
    monkeypatch.delitem(TRANSITIONS, (S.STA6, E.A_RELEASE_RQ_RECEIVED))
    _associated(peer)
    peer.sendall(bytes([PDUType.A_RELEASE_RQ, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    pdu_type, body = read_pdu(peer)
    assert pdu_type == PDUType.A_ABORT and body[3] == AbortReason.UNEXPECTED_PDU


def test_silence_past_the_network_timeout_is_a_reason_not_specified_abort() -> None:
    with _connected(network_timeout=0.2) as sock:
        _associated(sock)
        pdu_type, body = read_pdu(sock)
        assert pdu_type == PDUType.A_ABORT
        assert (body[2], body[3]) == (0x02, AbortReason.REASON_NOT_SPECIFIED)  # provider
        assert sock.recv(1) == b""  # then closed
