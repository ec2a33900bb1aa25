/**
 * The errors of the agent channel. Guest twin: the agent's error replies
 * (`{"type": "error", "code", "message"}`, spec/guest-protocol.md), raised across its
 * modules; their `code` reaches callers as `AgentError.code`, as sent (bounded by
 * sanitize.ts), so callers match codes, never messages.
 */

/** An error the agent reported, with its protocol code (not_found, bad_path, ...). */
export class AgentError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "AgentError";
  }
}

export class AgentClosedError extends Error {
  constructor(reason: string) {
    super(`guest agent channel closed: ${reason}`);
    this.name = "AgentClosedError";
  }
}
