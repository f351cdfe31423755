"""We as a DICOM SCU: send files (C-STORE), query (C-FIND), pull a study (C-MOVE or C-GET).

One module per job:
- peers.py: a peer's address (``AE@host:port``) and AE titles, checked;
- errors.py: the SCU's exceptions and DIMSE statuses in the standard's words;
- associations.py: opening and releasing associations, a failed one in words, C-ECHO;
- switches.py: pynetdicom's process-wide switches (quiet logging, streaming files), the one
  place they are turned;
- send.py: C-STORE of files; find.py: C-FIND; pull.py: C-MOVE and C-GET of a study;
- progress.py: how a send or pull tells its caller how far it got (the CLI draws the bar).

What shaped it (see docs/design.md, "Real peers"): Orthanc answers in the syntax of a
context it accepted, so we propose one presentation context per transfer syntax and files
keep their syntax on the way; pynetdicom as a sender is slow with small PDUs, so we offer a
large maximum PDU; Orthanc aborts a find/get/move from a caller missing in its
DicomModalities, and answers 0xA801 to a C-MOVE whose destination it does not know: the
errors say so.
"""

from compacs.service.dimse.scu.associations import MAX_CONTEXTS, associate, echo
from compacs.service.dimse.scu.errors import AddressError, NoContextError, ScuError
from compacs.service.dimse.scu.find import answer_value, find, parse_key
from compacs.service.dimse.scu.peers import Peer, check_ae_title, parse_peer
from compacs.service.dimse.scu.progress import Progress, Step
from compacs.service.dimse.scu.pull import PullReport, get_contexts, pull
from compacs.service.dimse.scu.send import DicomFile, SendReport, plan_associations, send_files

__all__ = [
    "MAX_CONTEXTS",
    "AddressError",
    "DicomFile",
    "NoContextError",
    "Peer",
    "Progress",
    "PullReport",
    "ScuError",
    "SendReport",
    "Step",
    "answer_value",
    "associate",
    "check_ae_title",
    "echo",
    "find",
    "get_contexts",
    "parse_key",
    "parse_peer",
    "plan_associations",
    "pull",
    "send_files",
]
