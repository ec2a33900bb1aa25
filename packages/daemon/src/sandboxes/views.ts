/** What callers see of a sandbox: its row as the API's SandboxInfo. */
import type { SandboxRow } from "../store/db.js";
import type { SandboxState } from "./lifecycle.js";

export interface SandboxInfo {
  id: string;
  /** The row's state: a sandbox paused for host disk space shows as ready (lifecycle.ts). */
  state: SandboxState;
  template: string;
  vcpu_count: number;
  mem_size_mib: number;
  created_at: string;
  expires_at: string;
  metadata: Record<string, string>;
}

/** The states a caller's list shows (a destroying sandbox is already gone for its user). */
export const LISTED_STATES: readonly SandboxState[] = ["creating", "ready", "dead"];

export function toInfo(row: SandboxRow): SandboxInfo {
  return {
    id: row.id,
    state: row.state,
    template: row.template,
    vcpu_count: row.vcpu_count,
    mem_size_mib: row.mem_size_mib,
    created_at: new Date(row.created_at).toISOString(),
    expires_at: new Date(row.expires_at).toISOString(),
    metadata: JSON.parse(row.metadata) as Record<string, string>,
  };
}
