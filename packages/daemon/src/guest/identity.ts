/**
 * The identity a restored clone takes before anything user-visible runs in it: fresh
 * entropy, the host's clock, its own hostname and machine-id. Guest twin: identity.py
 * (the `restore` request).
 */
import type { AgentConnection } from "./connection.js";

export interface RestoreIdentity {
  entropy: Buffer;
  timeNs: bigint;
  hostname: string;
  machineId: string;
}

export async function restoreIdentity(
  conn: AgentConnection,
  args: RestoreIdentity,
  timeoutMs: number,
): Promise<void> {
  await conn.request(
    {
      type: "restore",
      entropy: args.entropy.toString("base64"),
      time_ns: Number(args.timeNs),
      hostname: args.hostname,
      machine_id: args.machineId,
    },
    timeoutMs,
  );
}
