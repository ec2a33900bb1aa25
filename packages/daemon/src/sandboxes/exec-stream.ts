/**
 * An exec's event stream as the caller gets it: once it has started, a failure (the VM
 * died, the agent restarted, anything else) is reported in-band, so the stream always
 * ends with exactly one exit event.
 */
import { AgentClosedError, AgentError, type ExecEvent } from "../guest/agent-client.js";
import type { Logger } from "../util/logger.js";
import type { VmHandle as Vm } from "../vm/backend.js";
import type { StreamLease } from "./stream-budget.js";

export async function* guardExecStream(
  id: string,
  vm: Vm,
  events: AsyncIterable<ExecEvent>,
  log: Logger,
  lease?: StreamLease,
): AsyncGenerator<ExecEvent> {
  try {
    yield* events;
  } catch (err) {
    const died = err instanceof AgentClosedError || !vm.alive;
    const restarted = err instanceof AgentError && err.code === "agent_restarted";
    log.warn({ sandbox: id, err: String(err) }, "exec ended abnormally");
    yield {
      type: "exit",
      code: -1,
      error: {
        name: died ? "SandboxDied" : restarted ? "SandboxRestarted" : "SandboxError",
        value: died ? `sandbox ${id} stopped while the code ran` : (err as Error).message,
        traceback: "",
      },
      ...(lease?.dropped ? { truncated: true } : {}),
    };
  } finally {
    lease?.close();
  }
}
