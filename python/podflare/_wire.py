"""The request and response shapes of spec/openapi.yaml (the TypeScript SDK's wire.ts mirrors this).

Each table lists a shape's fields, "required" or "optional" as the spec says. The
TypeScript SDK's unit tests check these tables against the spec and against wire.ts, and
python/tests check the SDK's keywords and ExecResult against them, so a field added,
renamed or removed on one side fails a test.
"""
from typing import Dict, List, TypedDict
from urllib.parse import quote


class SandboxInfo(TypedDict):
    """components.schemas.Sandbox: what Sandbox(), connect, list and get_info answer."""

    id: str
    state: str
    template: str
    vcpu_count: int
    mem_size_mib: int
    created_at: str
    expires_at: str
    metadata: Dict[str, str]


SANDBOX_INFO_FIELDS = {
    "id": "required",
    "state": "required",
    "template": "required",
    "vcpu_count": "required",
    "mem_size_mib": "required",
    "created_at": "required",
    "expires_at": "required",
    "metadata": "required",
}

class ExecEvent(dict):
    """One event of run_code_stream: a dict (`event["type"]`) whose fields are attributes too
    (`event.type`, `event.data`), as the hosted service's events are."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# components.schemas.CreateSandbox: Sandbox()'s keywords, under the same names.
CREATE_SANDBOX_FIELDS = {
    "template": "optional",
    "vcpu_count": "optional",
    "mem_size_mib": "optional",
    "timeout_ms": "optional",
    "metadata": "optional",
}

# components.schemas.Exec: run_code's arguments, under the same names.
EXEC_FIELDS = {"code": "required", "language": "optional", "timeout_ms": "optional"}

# The `error` of an exit event: the uncaught exception.
EXEC_ERROR_FIELDS = {"name": "required", "value": "required", "traceback": "required"}

# components.schemas.ExecEvent, its first form: output.
EXEC_OUTPUT_EVENT_FIELDS = {"type": "required", "data": "required", "seq": "required", "ts": "required"}

# components.schemas.ExecEvent, its second form: the last event of every stream.
EXEC_EXIT_EVENT_FIELDS = {
    "type": "required",
    "code": "required",
    "error": "optional",
    "timed_out": "optional",
    "truncated": "optional",
    "cancelled": "optional",
    "seq": "required",
    "ts": "required",
}

# components.schemas.Error: every error answer's body.
ERROR_FIELDS = {"error": "required", "code": "required"}

# POST /v1/sandboxes/{id}/fork: its body and its answer; GET /v1/sandboxes: its answer.
FORK_FIELDS = {"n": "optional"}
FORK_RESPONSE_FIELDS = {"children": "optional"}
LIST_RESPONSE_FIELDS = {"sandboxes": "optional"}

# The exit event's fields -> ExecResult's (the flags are False unless the event says true).
EXIT_RESULT = {
    "code": "exit_code",
    "error": "error",
    "timed_out": "timed_out",
    "truncated": "truncated",
    "cancelled": "cancelled",
}
EXIT_FLAGS: List[str] = ["timed_out", "truncated", "cancelled"]


def sandbox_path(sandbox_id: str, *rest: str) -> str:
    """The path of a sandbox, or of one of its routes; every id is URL-encoded here."""
    return "/".join(["/v1/sandboxes"] + [quote(part, safe="") for part in (sandbox_id,) + rest])
