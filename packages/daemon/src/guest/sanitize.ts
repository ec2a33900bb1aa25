/**
 * Readers of the fields of the agent's frames, which are hostile: every value is bounded
 * (util/untrusted.ts's `str`/`count`) and none of them throws. Guest twin: none; the
 * agent builds these fields (dispatch.py, scheduler.py, files.py) and the host trusts
 * nothing of them.
 */
import { count, str } from "../util/untrusted.js";
import { AgentError } from "./errors.js";
import type { ExecEvent } from "./exec.js";
import type { FrameHeader } from "./frames.js";

/** What may be logged of a hostile header: a few bounded fields, never the whole object. */
export function headerSummary(h: FrameHeader): Record<string, unknown> {
  return {
    type: str(h.type, 64),
    id: typeof h.id === "number" ? h.id : null,
    code: str(h.code, 40),
    message: str(h.message, 500),
  };
}

/** An error reply as an AgentError: its code as sent (bounded), never reinterpreted. */
export function agentError(header: FrameHeader): AgentError {
  return new AgentError(
    str(header.code, 40, "error"),
    str(header.message, 2000, "the guest agent reported an error"),
  );
}

/** The fields of a hello reply the host keeps. */
export function helloFields(h: FrameHeader): { agent: string; python: string; pid: number } {
  return { agent: str(h.agent, 100), python: str(h.python, 40), pid: count(h.pid, 0) };
}

export function exitEvent(h: FrameHeader): ExecEvent {
  const event: ExecEvent = {
    type: "exit",
    code: Number.isSafeInteger(h.code) ? (h.code as number) : -1,
  };
  if (h.error && typeof h.error === "object") {
    const e = h.error as Record<string, unknown>;
    event.error = {
      name: str(e.name, 200),
      value: str(e.value, 10_000),
      traceback: str(e.traceback, 100_000),
    };
  }
  if (h.timed_out === true) event.timed_out = true;
  if (h.truncated === true) event.truncated = true;
  if (h.cancelled === true) event.cancelled = true;
  return event;
}
