"""The acceptor side of the DICOM Upper Layer state machine (PS3.8 9.2), as a table.

States, events and actions carry the standard's names (Tables 9-1, 9-5, 9-6 to 9-9,
9-10). Only what an acceptor meets is here: it never requests an association or a
release, so Sta4, Sta5, Sta7 and Sta9-Sta12 do not occur. Any (state, event) pair the
table lacks is a protocol error: A-ABORT, reason unexpected PDU (AA-8).

Where this node departs from the table of PS3.8 9.2, deliberately, each entry says so:
after sending A-ASSOCIATE-RJ or A-ABORT it closes the connection at once instead of
waiting in Sta13 for the peer to close (AE-8, AA-1, AA-8), and an A-ABORT before any
A-ASSOCIATE-RQ is answered with A-ABORT as any other unexpected PDU there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dicom_ai.dimse.pdv import AbortReason, PDUType

__all__ = ["TRANSITIONS", "Action", "Event", "State", "Transition", "event_for_pdu", "transition"]


class State(Enum):
    STA1 = "Sta1"  # Idle
    STA2 = "Sta2"  # Transport connection open (awaiting A-ASSOCIATE-RQ PDU)
    STA3 = "Sta3"  # Awaiting local A-ASSOCIATE response primitive
    STA6 = "Sta6"  # Association established and ready for data transfer
    STA8 = "Sta8"  # Awaiting local A-RELEASE response primitive
    STA13 = "Sta13"  # Awaiting Transport Connection Close Indication


class Event(Enum):
    TRANSPORT_CONNECTED = "Evt5"  # Transport connection indication
    A_ASSOCIATE_AC_RECEIVED = "Evt3"
    A_ASSOCIATE_RJ_RECEIVED = "Evt4"
    A_ASSOCIATE_RQ_RECEIVED = "Evt6"
    A_ASSOCIATE_ACCEPT = "Evt7"  # local A-ASSOCIATE response primitive (accept)
    A_ASSOCIATE_REJECT = "Evt8"  # local A-ASSOCIATE response primitive (reject)
    P_DATA_TF_RECEIVED = "Evt10"
    A_RELEASE_RQ_RECEIVED = "Evt12"
    A_RELEASE_RP_RECEIVED = "Evt13"
    A_RELEASE_RESPONSE = "Evt14"  # local A-RELEASE response primitive
    A_ABORT_REQUEST = "Evt15"  # local A-ABORT request: silent past the network timeout
    A_ABORT_RECEIVED = "Evt16"
    TRANSPORT_CLOSED = "Evt17"  # Transport connection closed indication
    ARTIM_EXPIRED = "Evt18"  # ARTIM timer expired
    INVALID_PDU = "Evt19"  # Unrecognized or invalid PDU received


class Action(Enum):
    AE_5 = "AE-5"  # start ARTIM; await the A-ASSOCIATE-RQ
    AE_6 = "AE-6"  # stop ARTIM; decide: access check, limit, presentation contexts
    AE_7 = "AE-7"  # send A-ASSOCIATE-AC
    AE_8 = "AE-8"  # send A-ASSOCIATE-RJ (and close)
    DT_2 = "DT-2"  # P-DATA indication: reassemble, serve complete messages
    AR_2 = "AR-2"  # A-RELEASE indication
    AR_4 = "AR-4"  # send A-RELEASE-RP, start ARTIM
    AR_5 = "AR-5"  # stop ARTIM (the requestor closed after release)
    AA_1 = "AA-1"  # send A-ABORT (and close)
    AA_2 = "AA-2"  # stop ARTIM, close
    AA_3 = "AA-3"  # the peer aborted: close
    AA_4 = "AA-4"  # A-P-ABORT indication: the connection closed under the association
    AA_5 = "AA-5"  # stop ARTIM: closed before any request
    AA_8 = "AA-8"  # send A-ABORT, unexpected or invalid PDU (and close)


@dataclass(frozen=True)
class Transition:
    action: Action
    next_state: State
    # The A-ABORT Reason/Diag. an abort action sends; None: the event's own (Evt19).
    abort_reason: AbortReason | None = None


_S, _E, _A = State, Event, Action
_CLOSE_AFTER_ABORT = _S.STA1  # PS3.8: Sta13; this node closes at once

TRANSITIONS: dict[tuple[State, Event], Transition] = {
    (_S.STA1, _E.TRANSPORT_CONNECTED): Transition(_A.AE_5, _S.STA2),
    # Sta2: only an A-ASSOCIATE-RQ is expected.
    (_S.STA2, _E.A_ASSOCIATE_RQ_RECEIVED): Transition(_A.AE_6, _S.STA3),
    (_S.STA2, _E.A_ASSOCIATE_AC_RECEIVED): Transition(
        _A.AA_1, _CLOSE_AFTER_ABORT, AbortReason.UNEXPECTED_PDU
    ),
    (_S.STA2, _E.A_ASSOCIATE_RJ_RECEIVED): Transition(
        _A.AA_1, _CLOSE_AFTER_ABORT, AbortReason.UNEXPECTED_PDU
    ),
    (_S.STA2, _E.P_DATA_TF_RECEIVED): Transition(
        _A.AA_1, _CLOSE_AFTER_ABORT, AbortReason.UNEXPECTED_PDU
    ),
    (_S.STA2, _E.A_RELEASE_RQ_RECEIVED): Transition(
        _A.AA_1, _CLOSE_AFTER_ABORT, AbortReason.UNEXPECTED_PDU
    ),
    (_S.STA2, _E.A_RELEASE_RP_RECEIVED): Transition(
        _A.AA_1, _CLOSE_AFTER_ABORT, AbortReason.UNEXPECTED_PDU
    ),
    # PS3.8: AA-2 (close without a word); answered as any unexpected PDU here.
    (_S.STA2, _E.A_ABORT_RECEIVED): Transition(
        _A.AA_1, _CLOSE_AFTER_ABORT, AbortReason.UNEXPECTED_PDU
    ),
    (_S.STA2, _E.INVALID_PDU): Transition(_A.AA_1, _CLOSE_AFTER_ABORT),
    (_S.STA2, _E.TRANSPORT_CLOSED): Transition(_A.AA_5, _S.STA1),
    (_S.STA2, _E.ARTIM_EXPIRED): Transition(_A.AA_2, _S.STA1),
    # Sta3: the local decision on the request.
    (_S.STA3, _E.A_ASSOCIATE_ACCEPT): Transition(_A.AE_7, _S.STA6),
    (_S.STA3, _E.A_ASSOCIATE_REJECT): Transition(_A.AE_8, _S.STA1),  # PS3.8: Sta13
    # AE-6 found that the A-ASSOCIATE-RQ does not decode: Evt19 as if in Sta2.
    (_S.STA3, _E.INVALID_PDU): Transition(_A.AA_1, _CLOSE_AFTER_ABORT),
    # Sta6: data transfer.
    (_S.STA6, _E.P_DATA_TF_RECEIVED): Transition(_A.DT_2, _S.STA6),
    (_S.STA6, _E.A_RELEASE_RQ_RECEIVED): Transition(_A.AR_2, _S.STA8),
    (_S.STA6, _E.A_ABORT_RECEIVED): Transition(_A.AA_3, _S.STA1),
    (_S.STA6, _E.A_ABORT_REQUEST): Transition(
        _A.AA_1, _CLOSE_AFTER_ABORT, AbortReason.REASON_NOT_SPECIFIED
    ),
    (_S.STA6, _E.INVALID_PDU): Transition(_A.AA_8, _CLOSE_AFTER_ABORT),
    (_S.STA6, _E.TRANSPORT_CLOSED): Transition(_A.AA_4, _S.STA1),
    # Sta8: the release is always granted.
    (_S.STA8, _E.A_RELEASE_RESPONSE): Transition(_A.AR_4, _S.STA13),
    # Sta13: PDUs are ignored (AA-6) while waiting for the requestor to close.
    (_S.STA13, _E.TRANSPORT_CLOSED): Transition(_A.AR_5, _S.STA1),
    (_S.STA13, _E.ARTIM_EXPIRED): Transition(_A.AA_2, _S.STA1),
}

_ILLEGAL = Transition(_A.AA_8, _CLOSE_AFTER_ABORT, AbortReason.UNEXPECTED_PDU)

_PDU_EVENTS = {
    PDUType.A_ASSOCIATE_RQ: Event.A_ASSOCIATE_RQ_RECEIVED,
    PDUType.A_ASSOCIATE_AC: Event.A_ASSOCIATE_AC_RECEIVED,
    PDUType.A_ASSOCIATE_RJ: Event.A_ASSOCIATE_RJ_RECEIVED,
    PDUType.P_DATA_TF: Event.P_DATA_TF_RECEIVED,
    PDUType.A_RELEASE_RQ: Event.A_RELEASE_RQ_RECEIVED,
    PDUType.A_RELEASE_RP: Event.A_RELEASE_RP_RECEIVED,
    PDUType.A_ABORT: Event.A_ABORT_RECEIVED,
}


def event_for_pdu(pdu_type: int) -> Event:
    """The event a received PDU type is (PS3.8 Table 9-10); an unknown type is Evt19."""
    try:
        return _PDU_EVENTS[PDUType(pdu_type)]
    except ValueError:
        return Event.INVALID_PDU


def transition(state: State, event: Event) -> Transition:
    """What to do on ``event`` in ``state``: the table's entry, else AA-8."""
    return TRANSITIONS.get((state, event), _ILLEGAL)
