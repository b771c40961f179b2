"""The coordinator's API to the HTTP layer (`pocketfed.server.http.app`), gathered from its parts:

    service          state and set-up (`open_coordinator`), refusal codes, manifests
    lifecycle        the round engine's driver: tick, commit, abort, stop
    device_requests  check-in, uploads, secure-aggregation messages and views
    evaluations      federated evaluation: sampled devices report loss and top-k sums of a release
    registry         registration and one-time enrollment tokens
    status           what GET /v1/status answers
"""

from pocketfed.server.device_requests import (
    checkin, commit_upload, eligibility_problem, receive_chunk, secagg_message, secagg_view, upload_received,
)
from pocketfed.server.evaluations import report as eval_report
from pocketfed.server.lifecycle import is_done, stop_reason, tick
from pocketfed.server.enrollment import ENROLL_TTL_S, enroll
from pocketfed.server.registry import register
from pocketfed.server.service import (
    DUPLICATE, ENROLLMENT_REFUSED, HASH_MISMATCH, INVALID_SECAGG, INVALID_UPDATE, KEY_TAKEN, NAME_TAKEN, NOT_ASSIGNED,
    NOT_ENROLLED, NOT_IN_COHORT, OFFSET_MISMATCH, ROUND_CLOSED, TOO_LARGE, TRUNCATED, UNKNOWN_ROUND, WRONG_STAGE,
    Assignment, Coordinator, Eligibility, Refused, Wait, manifest_for, open_coordinator,
)
from pocketfed.server.status import status

__all__ = [
    "checkin", "commit_upload", "eligibility_problem", "receive_chunk", "secagg_message", "secagg_view",
    "upload_received", "eval_report", "is_done", "stop_reason", "tick", "ENROLL_TTL_S", "enroll", "register", "DUPLICATE",
    "ENROLLMENT_REFUSED", "HASH_MISMATCH", "INVALID_SECAGG", "INVALID_UPDATE", "KEY_TAKEN", "NAME_TAKEN",
    "NOT_ASSIGNED", "NOT_ENROLLED", "NOT_IN_COHORT", "OFFSET_MISMATCH", "ROUND_CLOSED", "TOO_LARGE", "TRUNCATED",
    "UNKNOWN_ROUND", "WRONG_STAGE", "Assignment", "Coordinator", "Eligibility", "Refused", "Wait", "manifest_for",
    "open_coordinator", "status",
]
