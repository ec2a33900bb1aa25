/**
 * Start-up reconciliation. A sandbox cannot outlive the daemon that ran it (its VM dies
 * with its parent), so whatever a previous run left is ended and removed: rows marked
 * ended (through the lifecycle's edges), and what the VM backend left behind (its
 * processes, directories, memory files and cgroups: the backend's removeLeftovers()).
 */
import type { Store } from "../store/db.js";
import type { Logger } from "../util/logger.js";
import type { LeftoversReport, VmBackend } from "../vm/backend.js";
import { LIVE_STATES, Lifecycle } from "./lifecycle.js";

export interface ReconcileReport extends LeftoversReport {
  sandboxesEnded: number;
}

export async function reconcile(
  store: Store,
  backend: Pick<VmBackend, "removeLeftovers">,
  log: Logger,
): Promise<ReconcileReport> {
  let sandboxesEnded = 0;
  const lifecycle = new Lifecycle(store);
  for (const row of store.listSandboxes(LIVE_STATES)) {
    lifecycle.end(row.id, "the daemon restarted"); // a running one passes through destroying
    sandboxesEnded++;
  }
  const report: ReconcileReport = { sandboxesEnded, ...(await backend.removeLeftovers(log)) };
  store.pruneEnded(7 * 24 * 3600_000);
  if (
    report.sandboxesEnded + report.processesKilled + report.filesRemoved + report.cgroupsRemoved >
    0
  ) {
    log.warn(report, "reconciled what a previous daemon run left behind");
  }
  return report;
}
